"""Shared fixtures: offline environment, a private model cache, a small fast config, and an adapted NF4 model."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # the suite must never reach the hub
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config):
    """Triton's mode, chosen before any test module imports triton (transformers and peft do): its CPU
    interpreter (TRITON_INTERPRET=1), so the kernels of train/kernels/lora_kernels.py run without a GPU, except for
    `pytest -m gpu` on a CUDA machine (scripts/gpu_check.sh), where tests/test_gpu.py runs them compiled."""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with -m gpu (scripts/gpu_check.sh), "
                                       "skipped where CUDA is not available")
    gpu_run = (config.getoption("markexpr", "") or "").strip() == "gpu" and _cuda()
    os.environ["TRITON_INTERPRET"] = "0" if gpu_run else "1"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """builtin:tiny-llama materialises into a per-session cache, never the user's."""
    old = os.environ.get("QLORA_TRAIN_CACHE")
    os.environ["QLORA_TRAIN_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if old is None:
        os.environ.pop("QLORA_TRAIN_CACHE", None)
    else:
        os.environ["QLORA_TRAIN_CACHE"] = old


def small_config(output_dir, **sections):
    """The demo task, shrunk to run in seconds. `sections` override per section, e.g. train={...}."""
    import torch

    from train.config import from_dict

    raw = {
        "run": {"output_dir": str(output_dir), "seed": 7},
        "model": {"name_or_path": "builtin:tiny-llama"},
        # on CPU float32, not auto: auto picks bf16 on a CPU with native bf16 (AVX-512/AMX) and float32 elsewhere,
        # and the CPU tests' tolerances and outcomes were set in float32; the same suite then passes on either kind of
        # CI machine (auto itself: tests/test_precision.py). On a GPU auto (bf16): the GPU checks run the fast path
        "quant": {"compute_dtype": "auto" if torch.cuda.is_available() else "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "data": {
            "train": str(REPO / "data/demo/train.jsonl"),
            "eval_fraction": 0.2,
            "prompt": "How much does this cost?\n\n{text}\n\nPrice is $",
            "completion": "{price:.0f}.00",
            "max_length": 96,
            "max_rows": 80,  # 64 train + 16 eval rows
        },
        "train": {"max_steps": 6, "lr": 3e-3, "batch_size": 4, "grad_accum": 2, "save_every": 3,
                  "optimizer": "adamw_torch", "warmup_ratio": 0.0},
        "eval": {"task": "numeric", "limit": 12, "batch_size": 6, "max_new_tokens": 6},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


@pytest.fixture
def tiny_tok():
    from train import model, tiny

    path = tiny.materialize("builtin:tiny-llama")
    from train.config import ModelCfg

    return model.load_tokenizer(str(path), ModelCfg(name_or_path=str(path)))


def adapted_nf4(cfg, use_cache: bool = False, std: float = 0.05):
    """The config's base loaded as fit loads it (4-bit, prepared for k-bit training) and wrapped in LoRA, with every
    lora_B drawn from N(0, std), seeded: peft starts B at zero, which would leave the adapter out of every output
    and of every gradient but B's. use_cache=False as training runs; eval tests that generate keep it on."""
    import torch

    from train import lora, model

    base = model.prepare_for_kbit(model.load_base(cfg, model.resolve_model_path(cfg.model), quiet=True), cfg)
    if not use_cache:
        base.config.use_cache = False
    torch.manual_seed(0)
    net = lora.wrap(base, cfg.lora)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, std)
    return net


def aten_calls():
    """A context manager recording the name of every aten op dispatched inside it (`.names`, in order): what a
    piece of code launches, to check that a path makes no copy or concatenation it does not need."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    return Calls()
