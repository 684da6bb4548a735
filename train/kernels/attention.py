"""Padding-free attention: one varlen FlashAttention call per layer over all rows of a flattened batch.

transformers' sdpa handles a padding-free batch (rows concatenated, positions restarting per row)
with a dense block-diagonal mask; PyTorch's own varlen kernel (torch >= 2.10, CUDA) skips the masked
blocks entirely: +72% tokens/s on the 8B benchmark (docs/benchmarks.md). Anything else — padded
batches, generation, CPU — falls through to plain sdpa, which is correct everywhere.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger("train")

NAME = "sdpa_varlen"
_noted: list[bool] = []  # the CPU fallback notice is said once per process


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.is_available()


def register() -> str:
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.11+ / 2.10
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}  # else FlashAttention's native GQA

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        cu = kw.get("cu_seq_lens_q")  # TRL's padding-free collator sends these; padded batches do not
        if cu is None or query.shape[0] != 1 or not query.is_cuda:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kw)
        if query.dtype == torch.float32:
            query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
        cu = cu.to(torch.int32)
        n = int(kw["max_length_q"])
        out = varlen_attn(q, k, v, cu, cu, n, n, scale=scaling, **causal, **gqa)
        return out[None], None  # (1, tokens, heads, head_dim), as transformers expects

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # padded batches / generation get sdpa's mask
    return NAME


def effective_packing(cfg) -> str:
    """train.packing as run: without the varlen kernel (CPU, old torch), `auto` attention turns the
    default padding_free into padded batches — sdpa's dense block-diagonal mask over a flattened batch
    costs (rows x length)^2, far more than padding. Explicit choices are kept."""
    if cfg.train.packing == "padding_free" and cfg.model.attn_implementation == "auto" and not available():
        return "none"
    return cfg.train.packing


def resolve(cfg) -> str:
    """model.attn_implementation as passed to from_pretrained; "auto" picks varlen for padding-free
    training on a GPU that has it, else sdpa (with a one-line notice when the fast path is off)."""
    want = cfg.model.attn_implementation
    padding_free = cfg.train.packing in ("padding_free", "bfd")
    if want == NAME or (want == "auto" and padding_free and available()):
        if not available():
            from train.errors import UserError

            raise UserError("model.attn_implementation: sdpa_varlen needs a CUDA GPU and torch >= 2.10; use auto or sdpa")
        return register()
    if want == "auto" and padding_free and not _noted:
        _noted.append(True)
        log.info("attention: no varlen kernel here (CPU or torch < 2.10): padded batches and sdpa instead of "
                 "the padding-free fast path")
    return "sdpa" if want == "auto" else want
