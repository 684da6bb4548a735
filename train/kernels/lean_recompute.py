"""Owns the lean recompute: when a checkpointed decoder layer runs its forward again inside the backward, its last
projection (mlp.down_proj) computes only what its backward reads, not its output.

Why: checkpointing reruns a layer's forward only to rebuild what each op's backward reads. down_proj's output joins
the residual sum that is the layer's output, and nothing reads it there: the sum's backward reads no values, and the
fused Function's backward reads its input, x @ A.T and the base weight. So in the recompute the Function skips the
base matmul (hidden x intermediate, the largest of the layer's seven) and its NF4 dequantization, and returns
uninitialized memory of the output's shape. On the 8B workload the step's matmul time fell by 7.6 % and its GPU
time by 5.3 % (docs/benchmarks.md, session 10).

Only for decoder layers whose forward ends `residual + mlp(x)` with the MLP ending in down_proj (LAYERS): Gemma 2 and
3 normalize the MLP's output before the sum (post_feedforward_layernorm), and that norm's backward reads it. Inside
the tiled MLP (tiled_mlp.py) each chunk's own replay skips it too.
tests/test_lean_recompute.py checks, family by family, that the gradients equal a full recompute's bit for bit.
TRAIN_LEAN_RECOMPUTE=0 turns it off.
"""

from __future__ import annotations

import contextlib
import os
import threading

from train import patches

# decoder layers whose forward ends hidden = residual + mlp(...), the MLP's last op down_proj (transformers 5.25), by
# module and class: a remote-code class of the same name may do anything with the MLP's output. Each one is tested
# (tests/families.py); Gemma 1 would qualify but has no test family
LAYERS = frozenset(f"transformers.models.{family}.modeling_{family}.{cls}DecoderLayer" for family, cls in (
    ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("phi3", "Phi3")))

_state = threading.local()  # the recompute runs on the autograd thread; a forward elsewhere never sees its flag


def recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


def enabled() -> bool:
    return os.environ.get("TRAIN_LEAN_RECOMPUTE", "1") != "0"


def skips_output(module) -> bool:
    """Whether `module` (a fused LoRA layer) is a lean layer's down_proj called inside that layer's recompute (the
    switch read at each call: the bench may alternate it between steps)."""
    return module.lean_last and recomputing() and enabled()


@contextlib.contextmanager
def _recompute():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def replays_marked(function):
    """`function` for one checkpoint call: its second and later calls run marked as the recompute (the first is the
    forward, under torch's reentrant and non-reentrant checkpoint alike). train/kernels/tiled_mlp.py marks its chunks'
    replays too: a chunk's output is its down_proj's, and a replay's output is never read."""
    calls = 0

    def run(*a, **k):
        nonlocal calls
        calls += 1
        if calls == 1:
            return function(*a, **k)
        with _recompute():
            return function(*a, **k)

    return run


def _lean(checkpoint):
    """A layer's checkpoint function, the layer's recompute marked."""
    def lean_checkpoint(function, *args, **kwargs):
        return checkpoint(replays_marked(function), *args, **kwargs)

    return lean_checkpoint


def install(model) -> int:
    """Mark the down_proj of every checkpointed layer in LAYERS whose down_proj is a fused LoRA layer (it has
    `lean_last`: train/kernels/fused_lora.py), and wrap that layer's checkpoint function (idempotent). Returns how many
    layers run lean. Call after checkpointing is on."""
    from train.kernels.offload import checkpointed_layers

    if not enabled():
        return 0
    lean = 0
    for layer in checkpointed_layers(model):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if f"{type(layer).__module__}.{type(layer).__qualname__}" not in LAYERS or not hasattr(down, "lean_last"):
            continue
        if patches.wrap_checkpoint_function(layer, _lean):
            down.lean_last = True  # a plain attribute: no state-dict key
            lean += 1
    return lean
