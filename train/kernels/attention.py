"""Owns the choice of attention per model: padding-free varlen FlashAttention where it computes exactly the
model's own attention, else the model's own (sdpa, or eager where transformers has no sdpa path: Gemma 2).

transformers' sdpa handles a padding-free batch (rows concatenated, positions restarting per row)
with a dense block-diagonal mask; PyTorch's own varlen kernel (torch >= 2.10, CUDA) skips the masked
blocks entirely: +72% tokens/s on the 8B benchmark (docs/benchmarks.md). Anything else — padded
batches, generation, CPU — falls through to plain sdpa, which is correct everywhere.

The kernel is used only where it is exact, layer by layer (kernel_args): a sliding window becomes its
window_size, while attention logit softcapping (Gemma 2), attention sinks (gpt-oss), attention dropout and
non-causal layers have no kernel argument, so such a model keeps its own attention (one notice line).

A micro-batch that is one long causal row (long-context training) goes to sdpa's cuDNN kernel instead on a
Hopper GPU (one_row_cudnn): the same attention, 1.6-2x faster forward+backward than FlashAttention 2 and
a training step's peak memory the same (docs/benchmarks.md, session 5). Packed batches keep varlen:
sdpa has no sequence boundaries short of a dense mask.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from train import patches
from train.errors import UserError

log = logging.getLogger("train")

NAME = "sdpa_varlen"
_noted: set[str] = set()  # each fallback notice is said once per process
_fell_back: set[str] = set()  # bases whose `auto` attention left the varlen kernel: effective_packing pads them
KERNEL_LAYER_TYPES = ("full_attention", "sliding_attention")  # config.layer_types the kernel can compute
KERNEL_DEVICES = ("cuda",)  # where varlen_attn runs (tests/test_attention.py adds cpu for a reference kernel)
CUDNN_MIN_TOKENS = 4_096  # shortest one-row batch sent to cuDNN: 2x FA2 varlen fwd+bwd at 4K, 8K, 16K; 1.6x at 131K (H100)
CUDNN_CAPABILITY_MAJOR = 9  # Hopper only: cuDNN's attention loses to FlashAttention on Ampere and Blackwell
_cudnn_refused: set[str] = set()  # devices where cuDNN refused a shape once: varlen from then on


@dataclass(frozen=True)
class LayerAttention:
    """What one decoder layer's attention computes, as the model passes it to its attention function."""

    sliding_window: int | None = None  # transformers' W: a query sees itself and the W - 1 tokens before it
    softcap: float | None = None  # tanh cap on the attention logits (Gemma 2)
    sinks: bool = False  # learned attention sinks (gpt-oss's s_aux)
    dropout: float = 0.0  # attention dropout while training
    causal: bool = True
    layer_type: str = "full_attention"  # config.layer_types entry (chunked_attention etc. are not the kernel's)


def kernel_args(layer: LayerAttention, window_param: bool = True) -> dict | str:
    """varlen_attn's keyword arguments that compute exactly `layer`'s attention, or why no arguments do.

    transformers' sliding window W keeps keys with kv_idx > q_idx - W (masking_utils.sliding_window_overlay):
    the query and the W - 1 tokens before it. FlashAttention's window_size (left, right) keeps keys in
    [q - left, q + right], both ends included, so left = W - 1 (transformers' own flash path passes the same);
    (-1, 0) is plain causal. window_param=False: torch 2.10's varlen_attn, which takes is_causal only."""
    if layer.softcap is not None:
        return f"attention logit softcapping ({layer.softcap:g})"
    if layer.sinks:
        return "attention sinks"
    if layer.dropout:
        return f"attention dropout ({layer.dropout:g})"
    if not layer.causal:
        return "non-causal attention"
    if layer.layer_type not in KERNEL_LAYER_TYPES:
        return f"{layer.layer_type} layers"
    if not window_param:
        return {"is_causal": True} if layer.sliding_window is None else "a sliding window (needs torch >= 2.11)"
    return {"window_size": (-1 if layer.sliding_window is None else layer.sliding_window - 1, 0)}


def model_layers(model_config) -> list[LayerAttention]:
    """Each decoder layer's attention as the config describes it: config.layer_types picks the sliding layers
    (Gemma 2/3, Qwen2 with use_sliding_window, gpt-oss); without it config.sliding_window, when set, applies
    to every layer (Mistral, Phi-3). attn_logit_softcapping is Gemma's softcap."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None) or [None] * (getattr(c, "num_hidden_layers", None) or 0)
    softcap = getattr(c, "attn_logit_softcapping", None)
    dropout = float(getattr(c, "attention_dropout", 0.0) or 0.0)
    return [LayerAttention(sliding_window=window if t in (None, "sliding_attention") else None, softcap=softcap,
                           dropout=dropout, layer_type=t or "full_attention") for t in types]


def varlen_blocker(model_config, window_param: bool = True) -> str | None:
    """Why the varlen kernel cannot compute this model's attention exactly (None: it can, in every layer)."""
    if model_config is None:
        return None
    if not patches.supports_sdpa(causal_lm_class(model_config)):
        return own_attention(model_config)[1]
    for i, layer in enumerate(model_layers(model_config)):
        args = kernel_args(layer, window_param)
        if isinstance(args, str):
            return f"{args} in layer {i}"
    return None


def own_attention(model_config) -> tuple[str, str | None]:
    """(implementation, why): sdpa where transformers has it for this model, else eager and the reason."""
    if model_config is None or patches.supports_sdpa(causal_lm_class(model_config)):
        return "sdpa", None
    softcap = next((l.softcap for l in model_layers(model_config) if l.softcap is not None), None)
    why = f"attention logit softcapping ({softcap:g})" if softcap is not None else "no sdpa path in transformers"
    return "eager", why


def causal_lm_class(model_config):
    """The class AutoModelForCausalLM builds for this config; None for custom code (trust_remote_code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)


def arch(model_config) -> str:
    cls = causal_lm_class(model_config)
    return cls.__name__ if cls is not None else type(model_config).__name__


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.is_available()


def one_row_cudnn(cu: torch.Tensor, n: int, args: dict, device: torch.device) -> bool:
    """Whether a padding-free micro-batch goes to sdpa's cuDNN kernel instead of varlen: one sequence
    (cu_seq_lens = [0, n]) of at least CUDNN_MIN_TOKENS, plain causal (a window narrower than the row needs
    varlen's window_size), on a Hopper GPU where cuDNN has not refused a shape before."""
    left = args.get("window_size", (-1, 0))[0]  # torch 2.10's {"is_causal": True}: plain causal
    return (cu.numel() == 2 and n >= CUDNN_MIN_TOKENS and (left < 0 or left >= n - 1) and device.type == "cuda"
            and str(device) not in _cudnn_refused
            and torch.cuda.get_device_capability(device)[0] == CUDNN_CAPABILITY_MAJOR)


def cudnn_causal(query, key, value, scaling) -> torch.Tensor | None:
    """Causal attention of one row by sdpa's cuDNN kernel: (1, heads, tokens, head_dim) in, (1, tokens, heads,
    head_dim) out as transformers expects; None (and varlen from then on, one line) where cuDNN refuses it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    except RuntimeError as e:  # no cuDNN attention for this shape, dtype or build: sdpa says which
        _cudnn_refused.add(str(query.device))
        log.info("attention: cuDNN refused a %d-token row (%s): FlashAttention varlen for long rows instead",
                 query.shape[2], str(e).splitlines()[0][:120])
        return None
    return out.transpose(1, 2)


class LazyMask:
    """The mask sdpa would get, built on first use. transformers builds one for every packed batch: a dense
    [tokens, tokens] bool tensor held through the step (91 MB at the bench's 9,538-token micro-batch, 17 GB at
    131,072 packed tokens). Only sdpa's fallback reads it (padded batches, generation); the varlen kernel separates a
    padding-free batch's rows by cu_seq_lens and never does."""

    __slots__ = ("args", "kwargs", "built")

    def __init__(self, args, kwargs):
        self.args, self.kwargs, self.built = args, kwargs, None

    def get(self):
        from transformers.masking_utils import sdpa_mask

        if self.kwargs is not None:
            self.built, self.args, self.kwargs = sdpa_mask(*self.args, **self.kwargs), None, None
        return self.built


def tokens_major(t: torch.Tensor) -> torch.Tensor:
    """(1, heads, tokens, head_dim) as transformers passes q/k/v -> (tokens, heads, head_dim), a view. squeeze, not
    t[0]: indexing's backward writes the gradient into a zeroed (1, heads, tokens, head_dim) tensor, heads-major,
    which Liger's rope backward then copies back to tokens-major: on the 8B, 9 copies and fills a layer, 6.4 ms
    of GPU time and 288 launches a step (docs/benchmarks.md, session 14). squeeze's backward is a view, so the
    kernel's tokens-major gradient reaches q_proj's output without a copy."""
    return t.squeeze(0).transpose(0, 1)


def lazy_sdpa_mask(*args, **kwargs):
    """sdpa's mask, lazy in training (where the batches are padding-free). Without grad (eval, generation) it is built
    at once: generation may hand it back to the model as its attention_mask, where transformers reads it as a tensor."""
    if not torch.is_grad_enabled():
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(*args, **kwargs)
    return LazyMask(args, kwargs)


def register() -> str:
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    params = inspect.signature(varlen_attn).parameters
    window_param = "window_size" in params  # torch 2.11+; 2.10 takes is_causal only
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}  # else FlashAttention's native GQA

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        cu = kw.get("cu_seq_lens_q")  # TRL's padding-free collator sends these; padded batches do not
        layer = LayerAttention(sliding_window=kw.get("sliding_window"), softcap=kw.get("softcap"),
                               sinks=kw.get("s_aux") is not None, dropout=dropout, causal=is_causal is not False)
        args = kernel_args(layer, window_param)
        if isinstance(args, str) and (layer.softcap is not None or layer.sinks):  # resolve() keeps such models off
            raise RuntimeError(f"sdpa_varlen: layer {getattr(module, 'layer_idx', '?')} has {args}, which neither "
                               "the varlen kernel nor sdpa computes; set model.attn_implementation: eager")
        other_v = value.shape[-1] != query.shape[-1]  # e.g. MLA's narrower values: sdpa takes them, FlashAttention not
        if cu is None or query.shape[0] != 1 or query.device.type not in KERNEL_DEVICES or isinstance(args, str) \
                or other_v:
            mask = attention_mask.get() if isinstance(attention_mask, LazyMask) else attention_mask
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kw)  # the mask has the window
        if query.dtype == torch.float32 and query.is_cuda:  # FlashAttention takes 16-bit inputs only
            query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
        n = int(kw["max_length_q"])
        if one_row_cudnn(cu, n, args, query.device):
            out = cudnn_causal(query, key, value, scaling)
            if out is not None:
                return out, None
        q, k, v = map(tokens_major, (query, key, value))
        cu = cu.to(torch.int32)
        out = varlen_attn(q, k, v, cu, cu, n, n, scale=scaling, **args, **gqa)
        return out[None], None  # (1, tokens, heads, head_dim), as transformers expects

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, lazy_sdpa_mask)  # sdpa's mask, for padded batches and generation
    return NAME


def effective_packing(cfg) -> str:
    """train.packing as run: without the varlen kernel (CPU, old torch, or a model it cannot compute exactly),
    `auto` attention turns the default padding_free into padded batches — sdpa's dense block-diagonal mask
    over a flattened batch costs (rows x length)^2, far more than padding. Explicit choices are kept."""
    auto = cfg.model.attn_implementation == "auto"
    if cfg.train.packing == "padding_free" and auto and (not available() or cfg.model.name_or_path in _fell_back):
        return "none"
    return cfg.train.packing


def kernel_has_window() -> bool:
    """Whether varlen_attn takes window_size (torch >= 2.11): without it, no sliding layer is the kernel's."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


def choose(cfg, model_config=None) -> tuple[str, str | None]:
    """(attn_implementation for from_pretrained, a notice or None); no side effects. "auto": varlen for
    padding-free training on a GPU that has it, where it computes exactly this model's attention, else the
    model's own (sdpa, or eager: Gemma 2). An explicit choice the model cannot run exactly is a UserError.
    model_config None (a caller that has none): treated as a Llama-like model, whose every layer the kernel runs."""
    want = cfg.model.attn_implementation
    own, why = own_attention(model_config)
    name = arch(model_config) if model_config is not None else "this model"
    if want == NAME and not available():
        raise UserError("model.attn_implementation: sdpa_varlen needs a CUDA GPU and torch >= 2.10; use auto or sdpa")
    blocker = varlen_blocker(model_config, kernel_has_window()) if available() else "no varlen kernel"
    if want == NAME and blocker:
        raise UserError(f"model.attn_implementation: sdpa_varlen cannot compute {name}'s attention exactly "
                        f"({blocker}); use auto (picks {own}) or {own}")
    if want == "sdpa" and own != "sdpa":
        raise UserError(f"model.attn_implementation: {name} has no sdpa attention ({why}); use auto (picks {own}) "
                        f"or {own}")
    if want != "auto":
        return want, None
    if cfg.train.packing in ("padding_free", "bfd") and available():
        if blocker is None:
            return NAME, None
        return own, (f"attention: {name} has {blocker}, which the varlen kernel cannot compute: {own} attention "
                     "instead of the padding-free fast path")
    return own, None if own == "sdpa" else f"attention: {name}: {own} ({why}; transformers has no sdpa path for it)"


def resolve(cfg, model_config=None) -> str:
    """model.attn_implementation as passed to from_pretrained (choose(); registers the varlen attention when
    chosen), with a one-line notice when the fast path is off."""
    impl, notice = choose(cfg, model_config)
    if impl == NAME:
        return register()
    auto, padding_free = cfg.model.attn_implementation == "auto", cfg.train.packing in ("padding_free", "bfd")
    if auto and padding_free and available():
        _fell_back.add(cfg.model.name_or_path)  # its padding-free batches are padded (effective_packing)
    elif auto and padding_free:
        notice = notice or ("attention: no varlen kernel here (CPU or torch < 2.10): padded batches and sdpa instead "
                            "of the padding-free fast path")
    if notice and notice not in _noted:
        _noted.add(notice)
        log.info(notice)
    return impl
