"""open_clip's timm-backed visual towers (`TimmModel`) seen by surgery and relevancy.

Supported trunks are timm's `VisionTransformer` (SigLIP and SigLIP 2, timm ViTs with a CLS token or an
average pool) and `Eva` (EVA02: rotary positions on q and k) with a plain patch embedding. Convolutional and
hybrid trunks (ConvNeXt, ViTamin's convolutional stem) are refused in one line.

Surgery with an attention-pool head (SigLIP's MAP: one learned probe queries every token): the v-v path
runs in the trunk's last blocks exactly as for CLIP's ViT (reference/clip-surgery.md §2.3). The pool is the
readout, not a token mixer, so each surgery token goes through it as the only key it could attend to
(attention weight 1): value projection, output projection and the pool's residual MLP, then the rest of the
head. That is what §2.4 does for a CLS tower, where `ln_post` and `proj` reach every token. We do not put a
v-v attention into the pool as §2.6 does for the ResNet's attention pool: there the pool is the only
attention of the tower, here the trunk's blocks already carry the v-v path. The image embedding comes from
the original stream through the unmodified pool, so it equals the model's own `encode_image`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from xattn_cli.errors import UsageError
from xattn_cli.methods.surgery import BlockView, dual_streams, interpolate_grid_embedding
from xattn_cli.tensors import split_heads

SUPPORTED = "timm ViT (SigLIP, SigLIP 2) and EVA02 towers"


def check_trunk(trunk: torch.nn.Module, name: str) -> None:
    """UsageError unless surgery and relevancy can see every block of `trunk`."""
    from timm.layers import PatchEmbed
    from timm.models.eva import Eva, EvaBlock
    from timm.models.vision_transformer import Block, VisionTransformer

    kind = type(trunk).__name__
    if not isinstance(trunk, (VisionTransformer, Eva)):
        raise UsageError(f"{name}: its visual tower is timm {kind}, a convolutional network; surgery and "
                         f"relevancy need attention blocks ({SUPPORTED})")
    if type(trunk.patch_embed) is not PatchEmbed:
        raise UsageError(f"{name}: its timm {kind} tower has a {type(trunk.patch_embed).__name__} stem; "
                         f"only plain patch embeddings are supported ({SUPPORTED})")
    odd = {type(block).__name__ for block in trunk.blocks if type(block) not in (Block, EvaBlock)}
    gated = any(getattr(block.attn, "gate", None) is not None for block in trunk.blocks)
    pool = getattr(trunk, "attn_pool", None)
    if odd or gated or getattr(trunk, "rope_mixed", False) or (pool is not None and pool.pos_embed is not None):
        what = f"{', '.join(sorted(odd))} blocks" if odd else "gated or depth-mixed attention, or a positional pool"
        raise UsageError(f"{name}: its timm {kind} tower has {what}, which surgery and relevancy do not read")


def patch_size(visual: torch.nn.Module) -> tuple[int, int]:
    return tuple(visual.trunk.patch_embed.patch_size)


def embed(trunk: torch.nn.Module, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens before the first block (B, prefix + N, D), the positional table resized to `grid`."""
    stem = trunk.patch_embed
    tokens = stem.norm(stem.proj(pixels).flatten(2).transpose(1, 2))  # (B, N, D)
    prefix = [token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
              for token in (trunk.cls_token, getattr(trunk, "reg_token", None)) if token is not None]
    table = trunk.pos_embed
    if table is not None and trunk.no_embed_class:  # the table covers the patches only
        tokens = tokens + interpolate_grid_embedding(table[0], grid, prefix=0).to(tokens.dtype)
    tokens = torch.cat(prefix + [tokens], dim=1)  # (B, prefix + N, D)
    if table is not None and not trunk.no_embed_class:
        tokens = tokens + interpolate_grid_embedding(table[0], grid, prefix=trunk.num_prefix_tokens).to(tokens.dtype)
    return trunk.norm_pre(tokens)


def block_views(trunk: torch.nn.Module, grid: tuple[int, int]) -> list[BlockView]:
    rope = getattr(trunk, "rope", None)
    if rope is not None:
        # (N, 2·d_rope) for this grid; timm's public calls serve only the native grid of a cached embedding
        rope = rope._build_embed_cat(list(grid), rope.bands)
    return [_block_view(block, rope) for block in trunk.blocks]


def _block_view(block: torch.nn.Module, rope: torch.Tensor | None) -> BlockView:
    """A timm `Block` or `EvaBlock`: fused or separate q/k/v, q/k norms, rotary q and k (EVA), scale norm,
    layer scale (`ls1`/`ls2` or `gamma_1`/`gamma_2`)."""
    attention = block.attn
    heads = attention.num_heads
    gamma_1, gamma_2 = getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)
    scale_1 = getattr(block, "ls1", lambda x: x if gamma_1 is None else gamma_1 * x)
    scale_2 = getattr(block, "ls2", lambda x: x if gamma_2 is None else gamma_2 * x)

    def qkv(normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if getattr(attention, "qkv", None) is not None:
            bias = attention.qkv.bias
            if getattr(attention, "q_bias", None) is not None:  # EVA keeps the biases apart (k has none)
                bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
            parts = F.linear(normed, attention.qkv.weight, bias).chunk(3, dim=-1)  # 3 × (B, n, D)
        else:
            parts = (attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed))
        q, k, v = (split_heads(part, heads) for part in parts)  # 3 × (B, H, n, d)
        q, k = attention.q_norm(q), attention.k_norm(k)
        if rope is not None:
            q, k = _rotate(q, rope, attention), _rotate(k, rope, attention)
        return q, k, v

    return BlockView(
        forward=block if rope is None else lambda x: block(x, rope=rope),
        norm1=block.norm1,
        qkv=qkv,
        attention_out=lambda merged: scale_1(attention.proj(attention.norm(merged))),
        ffn_residual=lambda x: x + scale_2(block.mlp(block.norm2(x))),
    )


def _rotate(x: torch.Tensor, rope: torch.Tensor, attention: torch.nn.Module) -> torch.Tensor:
    """EVA's rotary embedding on the patch tokens; prefix tokens stay as they are. (B, H, n, d)."""
    from timm.layers import apply_rot_embed_cat

    prefix = attention.num_prefix_tokens
    rotated = apply_rot_embed_cat(x[:, :, prefix:], rope, half=getattr(attention, "rotate_half", False))
    return torch.cat([x[:, :, :prefix], rotated.type_as(x)], dim=2)


def surgery_and_embedding(visual: torch.nn.Module, pixels: torch.Tensor, grid: tuple[int, int],
                          blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Surgery tokens (B, 1 + N, E), token 0 the image embedding, and the embedding (B, E)."""
    trunk = visual.trunk
    original, surgical = dual_streams(embed(trunk, pixels, grid), block_views(trunk, grid), blocks)
    embedding = visual.head(trunk.forward_head(trunk.norm(original)))  # (B, E): the model's own readout
    patches = _per_token_head(visual, trunk.norm(surgical[:, trunk.num_prefix_tokens:]))  # (B, N, E)
    return torch.cat([embedding[:, None], patches], dim=1), embedding


def _per_token_head(visual: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The head applied to each token on its own: an attention pool reduces to its value path. (B, N, E)."""
    trunk = visual.trunk
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        values = pool.kv(tokens).chunk(2, dim=-1)[1]  # (B, N, D): keys, then values
        tokens = pool.proj(values)
        if pool.mlp is not None:
            tokens = tokens + pool.mlp(pool.norm(tokens))
    return visual.head(trunk.head(trunk.fc_norm(tokens)))


def has_cls_readout(trunk: torch.nn.Module) -> bool:
    """Whether the embedding is read from one CLS token (the relevancy row), not pooled over tokens."""
    return trunk.num_prefix_tokens == 1 and trunk.cls_token is not None and trunk.global_pool == "token"
