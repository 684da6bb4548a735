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
    "_wrap_model", "_save_checkpoint", "_maybe_log_save_evaluate", "_supports_sdpa", "_last_lr", "initial_lr",
    "lora_variant", "_gradient_checkpointing_func",
)
# Files that may still name one of them, and why (none today: fused_lora.py asks patches.has_lora_variant).
ALLOWED: dict[str, tuple[str, ...]] = {}


def check(library, owner, name, params):
    try:
        patches.require(library, owner, name, params)
    except patches.PatchBroken as e:
        pytest.fail(f"{library} {patches.installed(library)} (tested {patches.TESTED.get(library)}): {e}")


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


def test_clip_takes_the_hooks_parameters_and_clips_as_trainer_does(tmp_path):
    """trainer_hooks' _clip_grad_norm: the norm and the clipped gradients equal Trainer's own clip over
    model.parameters() (frozen weights have no gradient), with the parameters from clip_parameters_hook, filtered at
    each step (a weight that starts requiring a gradient is clipped from then on)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    listed = list(model.parameters())

    class Listed(patches.trainer_hooks(Trainer)):
        def clip_parameters_hook(self, model):
            return listed  # the trainer's keeps such a list between steps (train/step_walks.py)

    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.3, report_to=[], use_cpu=True)
    ours_trainer, their_trainer = Listed(model=model, args=args), Trainer(model=model, args=args)
    for trainable in ("mlp", "mlp self_attn"):
        for name, p in model.named_parameters():
            p.requires_grad_(any(t in name for t in trainable.split()))
            p.grad = torch.randn_like(p) if p.requires_grad else None
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        theirs = their_trainer._clip_grad_norm(model)
        clipped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():
            if n in grads:
                p.grad.copy_(grads[n])
        ours = ours_trainer._clip_grad_norm(model)
        assert torch.equal(ours, theirs) and theirs > 0.3
        assert all(torch.equal(p.grad, clipped[n]) for n, p in model.named_parameters() if n in grads)



def test_a_sharded_run_clips_as_trainer_does_without_the_hooks_list(tmp_path, monkeypatch):
    """FSDP or DeepSpeed (patches.unsharded False): Trainer's own clip, and the parameter list is never asked for."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    asked = []

    class Listed(patches.trainer_hooks(Trainer)):
        def clip_parameters_hook(self, model):
            asked.append(1)
            return list(model.parameters())

    for p in model.parameters():
        p.grad = torch.ones_like(p)
    trainer = Listed(model=model, args=TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.3, report_to=[],
                                                          use_cpu=True))
    monkeypatch.setattr(patches, "unsharded", lambda accelerator: False)
    norm = trainer._clip_grad_norm(model)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(torch.ones_like(p))
                                                 for p in model.parameters()]))
    assert asked == [] and torch.allclose(norm, want)


def test_rebalance_sampler_assign_signature():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    check("transformers", BatchRebalanceSampler, "_assign", ("indices", "lengths"))
    params = inspect.signature(BatchRebalanceSampler.__init__).parameters
    missing = [a for a in patches.SAMPLER_ARGS if a not in params]
    assert not missing, (f"transformers {patches.installed('transformers')}: BatchRebalanceSampler lost {missing} "
                         f"(tested {patches.TESTED['transformers']})")
    patches.check_rebalance_sampler()


def test_rebalanced_sampler_yields_the_given_partition():
    """Each step takes transformers' rows; how they split across the ranks is `assign`'s (the token-balanced
    partition), which here differs from transformers' own."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    from train import sampler

    lengths = [50, 90, 20, 70, 30, 80, 10, 40]

    def per_rank(make):
        return [[set(b) for b in make(BatchRebalanceSampler(lengths, 4, 2, 1, seed=3, rank=r))] for r in range(2)]

    ours = per_rank(lambda s: patches.rebalanced(s, sampler.token_balanced))
    theirs = per_rank(lambda s: s)
    assert len(ours[0]) == len(theirs[0]) == 2  # two steps, one micro-batch per rank each
    for step in range(2):
        rows = sorted(ours[0][step] | ours[1][step])
        assert rows == sorted(theirs[0][step] | theirs[1][step])  # the same rows each step
        want = sampler.token_balanced(rows, [lengths[i] for i in rows], 2, 1)
        assert [ours[r][step] for r in range(2)] == [set(want[r][0]) for r in range(2)]
    assert ours != theirs, "transformers' own partition is the token-balanced one here: this proves nothing"


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


def test_restart_schedule_restarts_an_ended_torch_schedule():
    """An extended run's checkpoint restores a schedule at its end (lr 0); restart_schedule puts the new
    schedule's start back, and the next steps follow it as a fresh scheduler would."""
    import copy

    import torch
    from transformers import get_cosine_schedule_with_warmup

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return opt, get_cosine_schedule_with_warmup(opt, 0, 10)

    opt, sched = make()
    fresh = copy.deepcopy(sched.state_dict())
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    try:
        patches.restart_schedule(opt, sched, fresh)
    except patches.PatchBroken as e:
        pytest.fail(f"torch {patches.installed('torch')} (tested {patches.TESTED['torch']}): {e}")
    ref_opt, ref = make()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for _ in range(3):
        opt.step(), sched.step(), ref_opt.step(), ref.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


def test_restart_schedule_names_torch_when_the_state_changed():
    import torch

    class Renamed:
        def state_dict(self):
            return {"base_lrs": [1e-3], "last_lr": [1e-3]}

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(patches.PatchBroken, match=r"torch \S+: an LRScheduler no longer keeps \['_last_lr'"):
        patches.restart_schedule(opt, Renamed(), {})


def test_lean_dropout_moves_plain_lora_dropout_only():
    import torch
    from peft import LoraConfig, get_peft_model

    from train.kernels.dropout import LeanDropoutLinear

    def first_layer(use_dora):
        net = torch.nn.Sequential(torch.nn.Linear(8, 8))
        return get_peft_model(net, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.1, use_dora=use_dora))

    plain, dora = first_layer(False), first_layer(True)
    assert patches.lean_dropout(plain, LeanDropoutLinear) == 1 and patches.lean_dropout(dora, LeanDropoutLinear) == 0
    layer = plain.base_model.model[0]
    assert type(layer.lora_A["default"]) is LeanDropoutLinear and layer.lora_A["default"].dropout_p == 0.1
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    assert isinstance(dora.base_model.model[0].lora_dropout["default"], torch.nn.Dropout)


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
            if str(path.relative_to(TRAIN.parent)) in ALLOWED.get(name, ()):
                continue
            for m in re.finditer(rf"(?<![\w]){re.escape(name)}\b", text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(TRAIN.parent)}:{line}: {name}")
    assert not offenders, "private library internals outside train/patches.py:\n" + "\n".join(offenders)


LIBRARY_BASES = {"Trainer", "SFTTrainer", "Linear4bit", "PeftLinear4bit", "LoraLayer", "BatchRebalanceSampler",
                 "Sampler", "TrainerCallback"}


def private_overrides(source: str) -> list[str]:
    """`Class._name` for each `def _name` (not dunder) in a class deriving from a library class. A base is
    every name in its expression: `Trainer`, `transformers.Trainer`, and calls such as
    `patches.trainer_hooks(SFTTrainer)`, which build a subclass of their argument."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        names = {n.id if isinstance(n, ast.Name) else n.attr for b in node.bases for n in ast.walk(b)
                 if isinstance(n, (ast.Name, ast.Attribute))}
        if names & LIBRARY_BASES:
            found += [f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)
                      and item.name.startswith("_") and not item.name.startswith("__")]
    return found


def test_private_override_finder_sees_every_kind_of_base():
    source = (
        "class A(Trainer):\n    def _run_epoch(self): pass\n"
        "class B(transformers.Trainer):\n    def _wrap_model(self): pass\n"
        "class C(patches.trainer_hooks(SFTTrainer)):\n    def _save_checkpoint(self): pass\n    def __init__(self): pass\n"
        "class D(make(dict)):\n    def _ok(self): pass\n"
    )
    assert private_overrides(source) == ["A._run_epoch", "B._wrap_model", "C._save_checkpoint"]


def test_no_private_trainer_overrides_outside_patches():
    """No `def _name` in a class deriving from a library class (Trainer, SFTTrainer, peft/bnb layers, samplers),
    except dunder methods."""
    offenders = []
    for path in sorted(TRAIN.rglob("*.py")):
        if path.name == "patches.py" and path.parent == TRAIN:
            continue
        offenders += [f"{path.name}: {o}" for o in private_overrides(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders


@pytest.mark.parametrize("dora", [False, True])
def test_has_lora_variant_tells_dora_from_plain_lora(dora):
    """The fused layer hands variant adapters (DoRA) back to peft: patches.has_lora_variant must see them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    peft_model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], use_dora=dora))
    layer = next(m for m in peft_model.modules() if isinstance(m, LoraLayer))
    assert patches.has_lora_variant(layer, "default") is dora


def test_bitsandbytes_optimizer_internals():
    """train/optim.py's one-step AdamW calls bitsandbytes' per-tensor step pieces and reads its args and page manager."""
    import bitsandbytes as bnb
    import torch

    opt = bnb.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], optim_bits=32)
    try:
        patches.check_bnb_optimizer(opt)
    except patches.PatchBroken as e:
        pytest.fail(str(e))


def test_checkpointing_layers_call_their_checkpoint_function():
    """transformers' GradientCheckpointingLayer runs its forward through `_gradient_checkpointing_func` (once in the
    forward, again in the backward's recompute): train/kernels/lean_recompute.py tells the two apart there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    calls = []

    def wrap(checkpoint):
        def counted(function, *args, **kwargs):
            return checkpoint(lambda *a, **k: calls.append(torch.is_grad_enabled()) or function(*a, **k),
                              *args, **kwargs)
        return counted

    layers = model.model.layers
    assert all(patches.wrap_checkpoint_function(layer, wrap) for layer in layers)
    first = [layer._gradient_checkpointing_func for layer in layers]
    assert all(patches.wrap_checkpoint_function(layer, wrap) for layer in layers)  # once only
    assert [layer._gradient_checkpointing_func for layer in layers] == first
    ids = torch.randint(0, 64, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [False] * len(layers) + [True] * len(layers)  # the forwards without grad, then each recompute
    model.gradient_checkpointing_disable()
    assert not patches.wrap_checkpoint_function(layers[0], wrap)


def test_liger_kernel_globals_are_kernels():
    """Every kernel train/kernels/liger_launch.py wraps is still where Liger's ops look it up, a Triton kernel."""
    for module_name, names in patches.LIGER_KERNELS.items():
        for name in names:
            try:
                _, fn = patches.liger_kernel(module_name, name)
            except patches.PatchBroken as e:
                pytest.fail(str(e))
            assert hasattr(fn, "arg_names"), f"{module_name}.{name}"  # (JITFunction; InterpretedFunction in this suite)


def test_triton_launch_call():
    """train/kernels/launch.py calls a compiled kernel's launcher as Triton's own launch does
    (patches.TRITON_LAUNCH_CALL)."""
    pytest.importorskip("triton")
    try:
        patches.check_triton_launch()
    except patches.PatchBroken as e:
        pytest.fail(f"triton {patches.installed('triton')} (tested {patches.TESTED['triton']}): {e}")
    assert patches._triton_launch_ok()
