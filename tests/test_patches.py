"""Every private library internal train/patches.py relies on still exists with the signature it was tested
with; a failure names the library and the installed version (update the patch, or pin the version)."""

import inspect
import re
from pathlib import Path

import pytest

from train import patches

TRAIN = Path(__file__).resolve().parent.parent / "train"

# Private names of transformers / TRL / peft / bitsandbytes / accelerate / DeepSpeed / torch FSDP that train/
# uses: only train/patches.py may name them.
FORBIDDEN = (
    "_get_train_sampler", "_run_epoch", "_load_from_checkpoint", "_load_optimizer_and_scheduler",
    "_prepare_inputs", "_assign", "_zero3_consolidated_16bit_state_dict", "_fsdp_wrapped_module",
    "support_avx512bf16_for_cpu", "_register_custom_module", "_load_rng_state", "_inner_training_loop",
    "_wrap_model", "_save_checkpoint", "_maybe_log_save_evaluate", "_supports_sdpa",
)


def check(library, owner, name, params):
    try:
        patches.require(library, owner, name, params)
    except patches.PatchBroken as e:
        pytest.fail(f"{library} {patches.installed(library)} (tested {patches.TESTED.get(library)}): {e}")


def test_tested_versions_are_recorded():
    for lib in ("transformers", "peft", "bitsandbytes", "torch"):
        assert patches.TESTED[lib], lib


@pytest.mark.parametrize("name", sorted(patches.TRAINER_PRIVATES))
def test_trainer_private_signature(name):
    from transformers import Trainer

    check("transformers", Trainer, name, patches.TRAINER_PRIVATES[name])


def test_trainer_hooks_reach_the_privates():
    from transformers import Trainer

    hooked = patches.trainer_hooks(Trainer)
    for name in patches.TRAINER_PRIVATES:
        if name != "_prepare_inputs":
            assert name in vars(hooked), name
    for hook in ("train_sampler_hook", "epoch_begin_hook", "checkpoint_loaded_hook", "optimizer_load_hook"):
        assert callable(getattr(hooked, hook))


def test_rebalance_sampler_assign_signature():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    check("transformers", BatchRebalanceSampler, "_assign", ("indices", "lengths"))
    params = inspect.signature(BatchRebalanceSampler.__init__).parameters
    missing = [a for a in patches.SAMPLER_ARGS if a not in params]
    assert not missing, (f"transformers {patches.installed('transformers')}: BatchRebalanceSampler lost {missing} "
                         f"(tested {patches.TESTED['transformers']})")
    patches.check_rebalance_sampler()


def test_rebalanced_sampler_uses_the_partition():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    from train import sampler

    base = BatchRebalanceSampler([5, 9, 2, 7, 3, 8, 1, 4], 4, 2, 1, seed=3, rank=0)
    out = sampler.rebalance_for(base, padding_free=True, seed=3)
    assert isinstance(out, BatchRebalanceSampler) and type(out) is sampler.token_balanced_sampler_class()
    assert sum(len(b) for b in out) == 4  # rank 0's half of both steps


def test_peft_lora_layer_attributes():
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.1))
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert layers
    try:
        patches.check_peft_layer(layers[0])
    except patches.PatchBroken as e:
        pytest.fail(f"peft {patches.installed('peft')} (tested {patches.TESTED['peft']}): {e}")
    from peft.tuners.lora.bnb import Linear4bit

    check("peft", Linear4bit, "forward", ("x",))
    check("peft", Linear4bit, "__init__", ("base_layer", "adapter_name"))


def test_transformers_sdpa_support_flag():
    """train/kernels/attention.py keeps Gemma 2 (softcap) and gpt-oss (sinks) off sdpa by this flag."""
    from transformers import Gemma2ForCausalLM, GptOssForCausalLM, LlamaForCausalLM, PreTrainedModel

    check("transformers", PreTrainedModel, "_supports_sdpa", ())
    assert patches.supports_sdpa(LlamaForCausalLM) and patches.supports_sdpa(None)
    assert not patches.supports_sdpa(Gemma2ForCausalLM) and not patches.supports_sdpa(GptOssForCausalLM)


def test_swap_class_refuses_a_non_subclass():
    import torch

    with pytest.raises(patches.PatchBroken):
        patches.swap_class(torch.nn.Linear(2, 2), torch.nn.Conv1d)


def test_bitsandbytes_cpu_repack_flag():
    try:
        patches.check_bnb_repack_flag()
    except patches.PatchBroken as e:
        pytest.fail(str(e))


def test_fsdp_wrapper_prefix():
    try:
        patches.check_fsdp_prefix()
    except patches.PatchBroken as e:
        pytest.fail(str(e))
    assert patches.fsdp_clean_name("a._fsdp_wrapped_module.b._fsdp_wrapped_module") == "a.b"


def test_deepspeed_zero3_gather():
    ds = pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine

    check("deepspeed", DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict", ())
    params = inspect.signature(DeepSpeedEngine._zero3_consolidated_16bit_state_dict).parameters
    assert "exclude_frozen_parameters" in params, f"deepspeed {ds.__version__}: no exclude_frozen_parameters"


def test_require_names_library_and_version():
    class Owner:
        def f(self, a):
            pass

    with pytest.raises(patches.PatchBroken, match=r"transformers \S+: .*Owner\.gone is gone"):
        patches.require("transformers", Owner, "gone")
    with pytest.raises(patches.PatchBroken, match=r"transformers \S+: .*now takes \('a',\), expected \('b',\)"):
        patches.require("transformers", Owner, "f", ("b",))


def test_no_private_library_names_outside_patches():
    offenders = []
    for path in sorted(TRAIN.rglob("*.py")):
        if path.name == "patches.py" and path.parent == TRAIN:
            continue
        text = path.read_text(encoding="utf-8")
        for name in FORBIDDEN:
            for m in re.finditer(rf"(?<![\w]){re.escape(name)}\b", text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(TRAIN.parent)}:{line}: {name}")
    assert not offenders, "private library internals outside train/patches.py:\n" + "\n".join(offenders)


def test_no_private_trainer_overrides_outside_patches():
    """No `def _name` in a class deriving from a library class (Trainer, SFTTrainer, peft/bnb layers, samplers),
    except dunder methods and the autograd Function protocol."""
    import ast

    library_bases = ("Trainer", "SFTTrainer", "Linear4bit", "PeftLinear4bit", "LoraLayer", "BatchRebalanceSampler",
                     "Sampler", "TrainerCallback")
    offenders = []
    for path in sorted(TRAIN.rglob("*.py")):
        if path.name == "patches.py" and path.parent == TRAIN:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if not bases & set(library_bases):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("_") and not item.name.startswith("__"):
                    offenders.append(f"{path.name}: {node.name}.{item.name}")
    assert not offenders, offenders
