"""Compute precision: the dtype 4-bit matmuls run in on this machine (quant.compute_dtype: auto), the autocast
that training and evaluation share, and fp32 compute from 16-bit input embeddings and LM head (a CPU without native
bf16 keeps a large vocabulary's matrices in the checkpoint's dtype instead of doubling them)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("train")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}

# bf16 counts as native when its matmul takes at most this multiple of fp32's: AVX512-BF16/AMX CPUs run it at
# 0.5-1.3x fp32's time; CPUs that emulate it (AVX2 only, or AVX-512 without BF16) run it 8-180x slower. The line sits
# between the two: at 1.25 a Xeon with AMX, whose 128x128 bf16 matmul takes 1.0x fp32's, chose float32 in 1 of 3
# runs (timing noise), so two runs, two DDP ranks or a run and its resume trained in different precisions
NATIVE_BF16_MAX_RATIO = 3.0
PROBE_SIZE = 128  # 128x128 matmuls, one thread: ~0.1 ms in fp32, ~3 ms emulated bf16; the probe costs ~20-40 ms


@dataclasses.dataclass(frozen=True)
class Probe:
    fp32_ms: float
    bf16_ms: float

    @property
    def native_bf16(self) -> bool:
        return self.bf16_ms <= NATIVE_BF16_MAX_RATIO * self.fp32_ms


@functools.cache
def probe_cpu(rounds: int = 5) -> Probe:
    """Time one small matmul in fp32 and in bf16 on this CPU (measured, not guessed from CPU flags: a VM may
    hide or emulate them). One thread, no thread-pool wake-ups in the timing, and interleaved rounds whose best
    counts: other processes on a busy machine slow both dtypes alike."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PROBE_SIZE, PROBE_SIZE, generator=g) for _ in range(2))
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dtype: float("inf") for dtype in pairs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x, y in pairs.values():
            x @ y  # warm-up: oneDNN picks and caches its kernel on the first call
        for _ in range(rounds):
            for dtype, (x, y) in pairs.items():
                start = time.perf_counter()
                x @ y
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return Probe(best[torch.float32] * 1e3, best[torch.bfloat16] * 1e3)


def choose(on_gpu: bool, probe: Probe | None = None) -> tuple[str, str]:
    """quant.compute_dtype: auto -> (dtype name, why). `probe`: a measurement to decide on (tests play any CPU
    with it); None measures this CPU."""
    if on_gpu:
        return "bfloat16", "GPU"
    p = probe or probe_cpu()
    ratio = f"a bf16 matmul took {p.bf16_ms / p.fp32_ms:.1f}x fp32's time ({p.bf16_ms:.2f} vs {p.fp32_ms:.2f} ms)"
    cpu = f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    if p.native_bf16:
        return "bfloat16", f"{cpu} computes bf16 natively: {ratio}"
    return "float32", f"{cpu} has no native bf16: {ratio}"


def compute_dtype(q) -> str:
    """quant.compute_dtype as run: `auto` resolved for this machine (bf16 on GPU; on CPU bf16 only where it is
    native, else float32)."""
    if q.compute_dtype != "auto":
        return q.compute_dtype
    return choose(torch.cuda.is_available())[0]


def resolved(cfg, quiet: bool = False, recorded: str | None = None):
    """The config with quant.compute_dtype: auto replaced by what this machine runs, said in one line. A run
    records the result (config.yaml), so `train eval` reloads the adapter in the precision it was trained in, and a
    resumed run continues in it (`recorded`: the precision of the checkpoint it resumes from)."""
    if cfg.quant.compute_dtype != "auto":
        return cfg
    if recorded in DTYPES and recorded != "uint8":
        name, why = recorded, "the precision the resumed checkpoint was trained in"
    else:
        name, why = choose(torch.cuda.is_available())
    if not quiet:
        log.info("quant.compute_dtype: auto -> %s (%s)", name, why)
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, compute_dtype=name))


def torch_dtype(q) -> torch.dtype:
    return DTYPES[compute_dtype(q)]


def use_bf16(cfg) -> bool:
    """bf16 autocast (the Trainer's bf16 flag): train.bf16 if set, else whenever the compute dtype is bf16."""
    if cfg.train.bf16 is not None:
        return cfg.train.bf16
    if compute_dtype(cfg.quant) != "bfloat16":
        return False
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def precision_context(cfg):
    """The autocast training runs under (accelerate wraps the trained model's forward in it).
    Evaluation uses it too, so a reloaded adapter computes exactly what the trained model did."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16(cfg))


# --------------------------------------------------------------------------------------------
# fp32 compute from 16-bit embeddings and LM head (train/model.py decides where and wires it)

# The LM head's weight is upcast this many bytes of fp32 rows at a time, a chunk that stays in a CPU's L2/L3 cache:
# Gemma 3 1B's 262144 x 1152 head on an idle 2-core AVX2 EPYC took 112 / 193 / 448 ms for 1 / 16 / 64 tokens
# (the fp32 model's one matmul: 118 / 456 / 720 ms); 16 and 64 MiB chunks were slower (180-885 ms)
HEAD_CHUNK_BYTES = 4 * 2**20


def head_rows(weight: torch.Tensor) -> int:
    """Vocabulary rows per chunk of `weight` (vocab, hidden)."""
    return max(1, HEAD_CHUNK_BYTES // (4 * weight.shape[1]))


def chunked_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) in x's dtype, the weight's rows upcast a chunk at a time: never a full copy of it in
    that dtype. Each logit is the dot product the one-matmul F.linear computes: the same bits here for several
    tokens; for one token (a matrix-vector product) the BLAS may sum in another order (measured <= 3.5e-7 of the
    logit scale on Gemma 3 1B's shape)."""
    rows = head_rows(weight)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[..., part] = F.linear(x, weight[part].to(x.dtype), None if bias is None else bias[part].to(x.dtype))
    return out


class ChunkedHead(torch.autograd.Function):
    """The LM head over a frozen 16-bit weight (QLoRA never trains it): logits in the input's dtype, and in
    backward the input's gradient, summed over the same vocabulary chunks. The weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)  # the parameter itself: saving it holds no new memory
        ctx.x_dtype = x.dtype
        return chunked_logits(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = head_rows(weight)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = flat.new_zeros(flat.shape[0], weight.shape[1])
        for start in range(0, weight.shape[0], rows):
            grad_x.addmm_(flat[:, start:start + rows], weight[start:start + rows].to(flat.dtype))
        return grad_x.view(*grad.shape[:-1], weight.shape[1]).to(ctx.x_dtype), None, None


def _head_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward for a 16-bit LM head under fp32 compute (installed by compute_from_16bit)."""
    if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):  # a trained head: plain
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
    return ChunkedHead.apply(x, self.weight, self.bias)


def _embedding_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    """nn.Embedding's forward (and transformers' scaled-embedding one: times embed_scale) for a 16-bit table
    under fp32 compute: gather the rows, then upcast (exact), then scale in fp32 as the fp32 model does."""
    rows = F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                       self.scale_grad_by_freq, self.sparse).float()
    scale = getattr(self, "embed_scale", None)
    return rows if scale is None else rows * scale.to(rows.dtype)


def embedding_supported(module) -> bool:
    """Whether `module` computes what _embedding_forward reproduces: a plain nn.Embedding, or transformers'
    scaled word embedding (an nn.Embedding times `embed_scale`, whose exact value `scalar_embed_scale` holds)."""
    if not isinstance(module, torch.nn.Embedding) or module.max_norm is not None or "forward" in vars(module):
        return False
    return type(module).forward is torch.nn.Embedding.forward or hasattr(module, "scalar_embed_scale")


def head_supported(module) -> bool:
    return type(module) is torch.nn.Linear and "forward" not in vars(module)


def compute_from_16bit(embedding, head) -> None:
    """Give the input embedding and the LM head (tied or not, `head` None for none) the forwards above. Their
    parameters, names and state-dict keys do not change. A scaled embedding's `embed_scale` becomes the fp32
    value the fp32 model multiplies by (a 16-bit load rounds it: sqrt(1152) = 33.94 -> 34.0 in bf16)."""
    if hasattr(embedding, "scalar_embed_scale"):
        embedding.embed_scale = torch.tensor(embedding.scalar_embed_scale, dtype=torch.float32,
                                             device=embedding.weight.device)
    embedding.forward = types.MethodType(_embedding_forward, embedding)
    if head is not None:
        head.forward = types.MethodType(_head_forward, head)
