"""`TokenMask`: attention that ignores masked key tokens (Ψ, `xattn_cli.nn.masked_attention`), through the same
interception points the recorder uses, so that recording under a mask records Ψ.

One keep vector (B, N) over a stream's tokens serves every site from `from_layer` on. With `from_layer` = 0,
the prefix tokens kept, CLS pooling and no token mixing outside attention (ViT, CLIP ViT towers), the masked
run equals a run on the kept tokens alone: a masked token's key is never read, and its own row affects no
other token (reference/meat.md §3). Backends: "hf" (Ψ from the scores in our attention function), "mha" (Ψ
in the recorder's stand-in), "timm" and "dropout" (probabilities renormalised over the kept keys by a hook on
the dropout they pass, run before any recorder's hook).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from xattn_cli.capture.recorder import _HF_MASKS, AttentionSite, mha_stand_in, use_hf_backend
from xattn_cli.nn.masked_attention import renormalise


class TokenMask:
    """Context manager: `with TokenMask(sites, keep): model(x)`; the model is as it was afterwards.

    keep: (B, N) in [0, 1] over the stream's tokens (prefix tokens first, always kept), exact 0/1 in the forward
    pass; a straight-through sample carries its gradient to the keys' weights.
    """

    def __init__(self, sites: Sequence[AttentionSite], keep: torch.Tensor, from_layer: int = 0, prefix: int = 1):
        chosen = {id(site.module): site for site in sites if site.layer >= from_layer}  # one per module
        if not chosen:
            raise ValueError(f"no attention site at layer {from_layer} or above to mask")
        self.sites, self.keep, self.prefix = list(chosen.values()), keep, prefix
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "TokenMask":
        try:
            for site in self.sites:
                self._install(site)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _install(self, site: AttentionSite) -> None:
        mask = (self.keep, self.prefix)
        if site.backend == "hf":
            undo = use_hf_backend(site.module)
            previous = _HF_MASKS.get(site.module)
            _HF_MASKS[site.module] = mask
            self._undo.append(lambda: (_HF_MASKS.pop(site.module, None) if previous is None
                                       else _HF_MASKS.__setitem__(site.module, previous), undo()))
        elif site.backend == "mha":
            stand_in, undo = mha_stand_in(site.module, site.attribute)
            previous = stand_in.mask
            stand_in.mask = mask
            self._undo.append(lambda: (setattr(stand_in, "mask", previous), undo()))
        elif site.backend == "timm":
            previous = site.module.fused_attn
            site.module.fused_attn = False
            self._undo.append(lambda: setattr(site.module, "fused_attn", previous))
            self._renormalise_after(site.module.attn_drop)
        elif site.backend == "dropout":
            self._renormalise_after(getattr(site.module, site.attribute))
        else:
            raise ValueError(f"unknown attention backend {site.backend!r}")

    def _renormalise_after(self, dropout: torch.nn.Module) -> None:
        """Ψ from the probabilities leaving `dropout`, before any recorder's hook sees them."""
        handle = dropout.register_forward_hook(lambda _m, _i, probs: renormalise(probs, self.keep, self.prefix),
                                               prepend=True)
        self._undo.append(handle.remove)
