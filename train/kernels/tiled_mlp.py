"""Owns the tiled MLP: a decoder layer's MLP run in token chunks, each chunk under its own activation checkpoint,
so the forward, the recompute and the backward hold one chunk's [tokens, intermediate_size] tensors at a time
instead of the whole row's (at 131K tokens on an 8B: 3.8 GB per tensor, about 22 GB in one layer's backward).

The chunks go through torch.utils.checkpoint (non-reentrant): it keeps each chunk's input only, replays the chunk
in the backward with the same RNG (LoRA dropout) and autocast state, and nests inside transformers' layer
checkpoint. The MLP is per token, so the chunked result equals the whole one up to matmul rounding; with LoRA
dropout > 0 each chunk draws its own mask (the same distribution, not the same draw).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from train.kernels import lean_recompute

TILE_TOKENS = 16384  # tokens per chunk: 16K x 4096 x 14336 matmuls still fill an H100; 1/8 of a 131K row's memory
AUTO_MIN_TOKENS = 32768  # auto tiles calls of >= 2 chunks; shorter ones keep one MLP pass fewer (no extra forward)


def tokens_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def tiles(setting, tokens: int, tile: int = TILE_TOKENS) -> bool:
    """Whether a call of `tokens` tokens runs in chunks under train.tile_mlp (auto | true | false)."""
    if setting is False or tokens <= tile:
        return False
    return setting is True or tokens >= AUTO_MIN_TOKENS


def chunked(forward, x: torch.Tensor, tile: int = TILE_TOKENS, replay: bool = True) -> torch.Tensor:
    """forward(x) computed over x's sequence dimension (-2) in chunks of about `tile` tokens, each replayed in the
    backward (replay=False keeps every chunk's activations: the reference the tests compare the replay with)."""
    rows = x.numel() // (x.shape[-1] * x.shape[-2])  # batch rows (1 when padding-free)
    chunks = x.split(max(1, tile // rows), dim=-2)
    if not (torch.is_grad_enabled() and replay):  # no backward to replay for (eval, a reentrant checkpoint's forward)
        return torch.cat([forward(c) for c in chunks], dim=-2)
    return torch.cat([checkpoint(lean_recompute.replays_marked(forward), c, use_reentrant=False) for c in chunks],
                     dim=-2)


def install(model, setting, tile: int = TILE_TOKENS) -> int:
    """Wrap the forward each decoder layer's `mlp` has now (Liger's, when the Trainer bound it) so that calls the
    setting tiles run chunked; returns how many MLPs were wrapped. Parameter names do not change."""
    from train.kernels.offload import checkpointed_layers

    wrapped = 0
    for layer in checkpointed_layers(model):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, torch.nn.Module) or getattr(mlp.forward, "tiled", False):
            continue
        inner = mlp.forward

        def forward(x, *args, _inner=inner, **kwargs):
            if args or kwargs or not tiles(setting, tokens_of(x), tile):
                return _inner(x, *args, **kwargs)
            return chunked(_inner, x, tile)

        forward.tiled = True  # a second install (resume) keeps one wrapper; Liger rebinding forward drops it
        mlp.forward = forward
        wrapped += 1
    return wrapped
