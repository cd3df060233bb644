"""open_clip CLIP models (ViT and ModifiedResNet towers) as `ClipAdapter`s."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from xattn_cli.methods.surgery import BlockView, dual_path, interpolate_grid_embedding
from xattn_cli.models import openclip_timm
from xattn_cli.models.clip import ClipAdapter
from xattn_cli.tensors import merge_heads, split_heads


def build_clip(arch: dict, vocab_size: int | None = None) -> torch.nn.Module:
    """An open_clip `CLIP` from an architecture dict (open_clip's model-config JSON format)."""
    from open_clip.model import CLIP

    text_cfg = dict(arch["text_cfg"])
    if vocab_size is not None:
        text_cfg["vocab_size"] = vocab_size
    return CLIP(embed_dim=arch["embed_dim"], vision_cfg=arch["vision_cfg"], text_cfg=text_cfg,
                quick_gelu=arch.get("quick_gelu", False))


def _block_view(block: torch.nn.Module) -> BlockView:
    """A view of open_clip's `ResidualAttentionBlock` (nn.MultiheadAttention inside)."""
    attention = block.attn
    heads = attention.num_heads

    def qkv(normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projected = F.linear(normed, attention.in_proj_weight, attention.in_proj_bias)  # (B, n, 3D)
        return tuple(split_heads(part, heads) for part in projected.chunk(3, dim=-1))  # 3 × (B, H, n, d)

    return BlockView(
        forward=block,
        norm1=block.ln_1,
        qkv=qkv,
        attention_out=lambda merged: block.ls_1(attention.out_proj(merged)),
        ffn_residual=lambda x: x + block.ls_2(block.mlp(block.ln_2(x))),
    )


class OpenClipAdapter(ClipAdapter):
    """An open_clip `CLIP` or `CustomTextCLIP` whose visual tower is a `VisionTransformer`, a `ModifiedResNet`
    or a timm ViT/EVA trunk (`TimmModel`, `xattn_cli.models.openclip_timm`)."""

    vision_prefixes = ("visual.",)

    def __init__(self, model: torch.nn.Module, tokenizer: Callable | None = None, name: str = "openclip"):
        super().__init__(model)
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        from xattn_cli.errors import UsageError

        self.name = name
        visual = model.visual
        self.is_resnet = isinstance(visual, ModifiedResNet)
        self.is_timm = isinstance(visual, TimmModel)
        if not (self.is_resnet or self.is_timm or isinstance(visual, VisionTransformer)):
            raise UsageError(f"{name}: unsupported open_clip visual tower {type(visual).__name__} "
                             f"(supported: ViT, ModifiedResNet, {openclip_timm.SUPPORTED})")
        if isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is not None:
            raise UsageError(f"{name}: open_clip ViT towers with attentional pooling are not supported")
        if isinstance(visual, VisionTransformer) and getattr(visual, "pool_type", "tok") != "tok":
            raise UsageError(f"{name}: open_clip ViT towers that pool by {visual.pool_type!r} (not the class token) "
                             "are not supported: maps and scores read the class token")
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise UsageError(f"{name}: open_clip text towers that pool by {model.text_pool_type!r} (not the end-of-text "
                             "token) are not supported")
        size = visual.image_size
        self.native_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if self.is_resnet:
            self.patch_size = (32, 32)
            self.default_surgery_blocks = 1
        elif self.is_timm:
            openclip_timm.check_trunk(visual.trunk, name)
            self.patch_size = openclip_timm.patch_size(visual)
            self.default_surgery_blocks = min(6, len(visual.trunk.blocks))
        else:
            patch = visual.patch_size
            self.patch_size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
            self.default_surgery_blocks = min(6, len(visual.transformer.resblocks))
        self.tokenizer = tokenizer

    @property
    def surgery_depth(self) -> int | None:
        if self.is_resnet:
            return None
        return len(self.model.visual.trunk.blocks if self.is_timm else self.model.visual.transformer.resblocks)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(texts).to(self.device)}  # (K, ctx)

    def encode_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(batch["input_ids"])

    def pooled_index(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"].argmax(dim=-1)  # open_clip pools at the largest id: end of text

    def token_words(self, batch: dict[str, torch.Tensor], row: int) -> list[str]:
        ids = batch["input_ids"][row].tolist()
        vocabulary = getattr(self.tokenizer, "vocab", None)
        if vocabulary is not None:  # our word tokenizer
            return [vocabulary[i] for i in ids]
        decoder = getattr(self.tokenizer, "decoder", {})  # open_clip's BPE tokenizer
        return [decoder.get(i, str(i)).replace("</w>", "") for i in ids]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def attention_sites(self) -> list:
        """Every self-attention of the ViT tower, then of the text tower (for relevancy)."""
        from xattn_cli.capture import AttentionSite
        from xattn_cli.errors import UsageError

        if self.is_resnet:
            raise UsageError(f"relevancy and token masks need a transformer vision tower; {self.name} is a ResNet "
                             "(use xattn surgery)")
        text = getattr(self.model, "text", self.model).transformer.resblocks  # CustomTextCLIP keeps it in .text
        text_sites = [AttentionSite(block, "self", "text", i, "mha") for i, block in enumerate(text)]
        if self.is_timm:
            trunk = self.model.visual.trunk
            if not openclip_timm.has_cls_readout(trunk):
                raise UsageError(f"relevancy and token masks read the CLS token; {self.name} pools its image tokens "
                                 f"(global_pool {trunk.global_pool!r}) instead; use xattn surgery")
            return [AttentionSite(block.attn, "self", "vision", i, "timm")
                    for i, block in enumerate(trunk.blocks)] + text_sites
        vision = self.model.visual.transformer.resblocks
        return [AttentionSite(block, "self", "vision", i, "mha") for i, block in enumerate(vision)] + text_sites

    def surgery_and_embedding(self, pixels: torch.Tensor,
                              blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.grid(tuple(pixels.shape[-2:]))
        if self.is_resnet:
            return self._resnet_surgery(pixels, grid)
        visual = self.model.visual
        if self.is_timm:
            return openclip_timm.surgery_and_embedding(visual, pixels, grid, blocks or self.default_surgery_blocks)
        tokens = visual.conv1(pixels)  # (B, D, gh, gw)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)  # (B, 1, D)
        positions = interpolate_grid_embedding(visual.positional_embedding, grid)  # (1 + N, D)
        tokens = visual.ln_pre(torch.cat([cls, tokens], dim=1) + positions.to(tokens.dtype))  # (B, n, D)
        views = [_block_view(block) for block in visual.transformer.resblocks]
        tokens = visual.ln_post(dual_path(tokens, views, blocks or self.default_surgery_blocks)) @ visual.proj
        return tokens, tokens[:, 0]  # (B, n, E), (B, E): CLS comes from the original path

    def _resnet_surgery(self, pixels: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ModifiedResNet: the attention pool becomes v-v attention for every token (reference §2.6)."""
        visual = self.model.visual
        features = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))  # (B, C, h, w)
        pool = visual.attnpool
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, n, C)
        tokens = tokens + interpolate_grid_embedding(pool.positional_embedding, grid).to(tokens.dtype)
        values = split_heads(pool.v_proj(tokens), pool.num_heads)  # (B, H, n, d)
        attended = F.scaled_dot_product_attention(values, values, values)  # (B, H, n, d)
        surgery = pool.c_proj(merge_heads(attended))  # (B, n, E)
        query = split_heads(pool.q_proj(tokens[:, :1]), pool.num_heads)  # (B, H, 1, d)
        keys = split_heads(pool.k_proj(tokens), pool.num_heads)  # (B, H, n, d)
        pooled = F.scaled_dot_product_attention(query, keys, values)  # (B, H, 1, d)
        return surgery, pool.c_proj(merge_heads(pooled))[:, 0]  # (B, n, E), (B, E)

