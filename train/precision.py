"""Compute precision: the dtype 4-bit matmuls run in on this machine (quant.compute_dtype: auto), and the autocast
that training and evaluation share."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import torch

log = logging.getLogger("train")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}

# bf16 counts as native when its matmul takes at most this multiple of fp32's: AVX512-BF16/AMX CPUs run it
# faster than fp32; CPUs that emulate it (AVX2 only, or AVX-512 without BF16) run it 8-180x slower
NATIVE_BF16_MAX_RATIO = 1.25
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


def resolved(cfg, quiet: bool = False):
    """The config with quant.compute_dtype: auto replaced by what this machine runs, said in one line. A run
    records the result (config.yaml), so `train eval` reloads the adapter in the precision it was trained in."""
    if cfg.quant.compute_dtype != "auto":
        return cfg
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
