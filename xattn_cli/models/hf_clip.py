"""Hugging Face `CLIPModel` as a `ClipAdapter` (same surgery method, HF module names)."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from xattn_cli.methods.surgery import BlockView, dual_path, interpolate_grid_embedding
from xattn_cli.models.clip import ClipAdapter
from xattn_cli.tensors import merge_heads, split_heads


def _layer_view(layer: torch.nn.Module) -> BlockView:
    """A view of HF's `CLIPEncoderLayer` (separate q/k/v projections)."""
    attention = layer.self_attn
    heads = attention.num_heads

    def qkv(normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(split_heads(proj(normed), heads)
                     for proj in (attention.q_proj, attention.k_proj, attention.v_proj))  # 3 × (B, H, n, d)

    def forward(x: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv(layer.layer_norm1(x))
        x = x + attention.out_proj(merge_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v)))
        return x + layer.mlp(layer.layer_norm2(x))

    return BlockView(
        forward=forward,
        norm1=layer.layer_norm1,
        qkv=qkv,
        attention_out=attention.out_proj,
        ffn_residual=lambda x: x + layer.mlp(layer.layer_norm2(x)),
    )


class HFClipAdapter(ClipAdapter):
    """A `transformers.CLIPModel` with its tokenizer (a callable: list of texts → dict of tensors)."""

    vision_prefixes = ("vision_model.", "visual_projection.")

    def __init__(self, model: torch.nn.Module, tokenizer: Callable | None = None, name: str = "hf-clip"):
        super().__init__(model)
        self.name = name
        vision = model.config.vision_config
        self.native_size = (vision.image_size, vision.image_size)
        self.patch_size = (vision.patch_size, vision.patch_size)
        self.default_surgery_blocks = min(6, len(model.vision_model.encoder.layers))
        self.tokenizer = tokenizer

    @property
    def surgery_depth(self) -> int | None:
        return len(self.model.vision_model.encoder.layers)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts longer than the text tower's positions are cut, end-of-text kept last, as open_clip does."""
        length = self.model.config.text_config.max_position_embeddings
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        if batch["input_ids"].shape[1] > length:
            warnings.warn(f"a text is longer than the {length} tokens {self.name} reads; it is truncated")
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    def encode_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.model.get_text_features(**batch)
        return output if torch.is_tensor(output) else output.pooler_output

    def pooled_index(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        eos = self.model.config.text_config.eos_token_id
        ids = batch["input_ids"]
        if eos == 2:  # legacy CLIP configs: HF pools at the largest id, as OpenAI does
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)

    def token_words(self, batch: dict[str, torch.Tensor], row: int) -> list[str]:
        return [t.replace("</w>", "") for t in self.tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model.get_image_features(pixel_values=pixels)
        return output if torch.is_tensor(output) else output.pooler_output

    def attention_sites(self) -> list:
        from xattn_cli.capture import AttentionSite

        vision, text = self.model.vision_model.encoder.layers, self.model.text_model.encoder.layers
        return ([AttentionSite(layer.self_attn, "self", "vision", i, "hf") for i, layer in enumerate(vision)]
                + [AttentionSite(layer.self_attn, "self", "text", i, "hf") for i, layer in enumerate(text)])

    def surgery_and_embedding(self, pixels: torch.Tensor,
                              blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        vision = self.model.vision_model
        embeddings = vision.embeddings
        grid = self.grid(tuple(pixels.shape[-2:]))
        tokens = embeddings.patch_embedding(pixels.to(embeddings.patch_embedding.weight.dtype))  # (B, D, gh, gw)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = embeddings.class_embedding.expand(tokens.shape[0], 1, -1)  # (B, 1, D)
        positions = interpolate_grid_embedding(embeddings.position_embedding.weight, grid)  # (1 + N, D)
        tokens = vision.pre_layrnorm(torch.cat([cls, tokens], dim=1) + positions)  # (B, n, D)
        views = [_layer_view(layer) for layer in vision.encoder.layers]
        tokens = dual_path(tokens, views, blocks or self.default_surgery_blocks)
        tokens = self.model.visual_projection(vision.post_layernorm(tokens))  # (B, n, E)
        return tokens, tokens[:, 0]  # CLS comes from the original path
