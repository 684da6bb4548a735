"""The flat per-step walks (train/step_walks.py): model.train()/eval() and zero_grad() leave every module and
gradient as torch's recursive walks do, on the real 4-bit LoRA model with its fused layers and groups; the lists are
made once and made again when a submodule is registered; a tree the flat walk cannot vouch for keeps torch's."""

import copy
import types

import pytest
import torch

from conftest import adapted_nf4, small_config
from train import step_walks

NO_SPLIT = types.SimpleNamespace(distributed_type="NO")


@pytest.fixture
def models(tmp_path):
    """(torch's walks, the flat walks): one 4-bit LoRA model with groups, deep-copied before the swap."""
    cfg = small_config(tmp_path / "run", quant={"compute_dtype": "float32"},
                       lora={"dropout": 0.1, "kernel": "fused", "groups": True})
    theirs = adapted_nf4(cfg)
    ours = copy.deepcopy(theirs)
    assert step_walks.install(ours, NO_SPLIT)
    assert type(ours).__name__.startswith("LeanWalks") and not type(theirs).__name__.startswith("LeanWalks")
    return theirs, ours


def _flags(model):
    return [m.training for m in model.modules()]


def _groups(model):
    return list({id(g): g for m in model.modules() for g in [m.__dict__.get("_lora_group")] if g is not None}.values())


def test_train_and_eval_set_every_module_as_torch_does(models):
    theirs, ours = models
    assert _groups(ours)
    for model in (theirs, ours):
        model.eval()
        assert not any(_flags(model))
        list(model.modules())[7].train()  # a submodule set by hand follows the next model-wide call
        model.eval()
        assert not any(_flags(model))
        list(model.modules())[7].eval()
        model.train()
    assert _flags(ours) == _flags(theirs) and all(_flags(ours))
    lists = ours.__dict__["_step_walks"]
    assert lists.flat and len(lists.modules) == len(list(ours.modules()))


def test_train_settles_the_lora_groups_as_each_member_would(models):
    """A group whose output went unclaimed stops grouping at the next model.train(), as torch's walk makes each
    member's train() do (train/kernels/lora_group.py)."""
    theirs, ours = models
    for model in (theirs, ours):
        for g in _groups(model):
            g.unclaimed, g.pending = True, ("x", 0, {})
        model.train()
        assert all(g.broken and g.pending is None for g in _groups(model))


def test_the_clips_parameters_come_from_the_lists(models):
    """QLoRATrainer's clip_parameters_hook: model.parameters() in model order, without walking the model again."""
    from train.trainer import trainer_class

    _, ours = models
    want = list(ours.parameters())
    hook = trainer_class().clip_parameters_hook
    assert hook(None, ours) == want
    walks = []
    ours.parameters = lambda *a, **k: walks.append(1) or iter(())
    assert hook(None, ours) == want and walks == []


def test_zero_grad_clears_every_gradient_without_walking_again(models):
    _, ours = models
    for p in ours.parameters():
        p.grad = torch.ones_like(p) if p.is_floating_point() else None
    ours.zero_grad()
    assert all(p.grad is None for p in ours.parameters())
    built = ours.__dict__["_step_walks"]
    ours.train()
    ours.zero_grad()
    assert ours.__dict__["_step_walks"] is built  # nothing registered since: the same lists
    p = next(ours.parameters())
    p.grad = torch.ones_like(p)
    ours.zero_grad(set_to_none=False)  # torch's own walk: zeros kept
    assert p.grad is not None and not p.grad.any()


def test_a_registered_submodule_rebuilds_the_lists(models):
    _, ours = models
    ours.train()
    built = ours.__dict__["_step_walks"]
    layer = next(m for m in ours.modules() if isinstance(m, torch.nn.ModuleList))
    layer.append(torch.nn.Linear(2, 2))
    ours.eval()
    assert ours.__dict__["_step_walks"] is not built and not layer[-1].training


def test_changes_no_hook_sees_are_caught(models):
    """An insert (ModuleList.insert writes _modules directly), a replaced parameter (the parameter hook) and a `del`:
    the next call makes the lists again, so no flag or gradient is left behind and a removed module is let go."""
    _, ours = models
    ours.train()
    layers = next(m for m in ours.modules() if isinstance(m, torch.nn.ModuleList))
    layers.insert(0, torch.nn.Linear(2, 2))
    ours.eval()
    assert not layers[0].training
    norm = next(m for m in ours.modules() if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__)
    norm.weight = torch.nn.Parameter(torch.ones_like(norm.weight))
    norm.weight.grad = torch.ones_like(norm.weight)
    ours.zero_grad()
    assert norm.weight.grad is None
    inserted = layers[0]
    del layers[0]
    ours.train()
    assert all(m is not inserted for m in ours.__dict__["_step_walks"].modules)


def test_a_copy_and_the_end_of_training(models):
    """A deep copy keeps its own lists, made for it; uninstall gives the model its own class back (it pickles)."""
    import pickle

    theirs, ours = models
    copied = copy.deepcopy(ours)
    copied.train()
    assert copied.__dict__["_step_walks"].model == id(copied)
    next(m for m in copied.modules() if isinstance(m, torch.nn.ModuleList)).append(torch.nn.Linear(2, 2))
    copied.eval()
    assert not any(_flags(copied))
    with pytest.raises(pickle.PicklingError):  # while training: its class lives only in step_walks' cache
        pickle.dumps(ours)
    step_walks.uninstall(ours)
    assert type(ours) is type(theirs) and "_step_walks" not in ours.__dict__
    assert type(pickle.loads(pickle.dumps(ours))) is type(theirs)


def test_a_model_class_with_its_own_train_keeps_torchs_walk():
    calls = []

    class Own(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = Own()
    step_walks.install(model, NO_SPLIT)
    model.eval()
    assert calls == [False] and not model.inner.training


def test_another_train_override_keeps_torchs_walk(models):
    """A module whose train() does more than the known overrides: the flat walk would skip it, so torch's runs."""
    _, ours = models
    calls = []

    class Counting(torch.nn.Linear):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    next(m for m in ours.modules() if isinstance(m, torch.nn.ModuleList)).append(Counting(2, 2))
    ours.eval()
    ours.train()
    assert calls == [False, True] and not ours.__dict__["_step_walks"].flat


def test_fsdp_and_deepspeed_keep_torchs_walks(tmp_path):
    cfg = small_config(tmp_path / "run", quant={"compute_dtype": "float32"})
    model = adapted_nf4(cfg)
    kind = type(model)
    for split in ("FSDP", "DEEPSPEED"):
        assert not step_walks.install(model, types.SimpleNamespace(distributed_type=split))
    assert type(model) is kind


def test_a_fit_with_evals_builds_the_lists_once_and_trains_every_module(tmp_path, monkeypatch):
    """Through Trainer: every step trains with every module training and every eval in between runs with none, and
    nothing in a step registers a module, so the lists are made once for the whole fit."""
    from transformers import TrainerCallback

    from train.fit import fit

    built = []
    lists = step_walks._Lists
    monkeypatch.setattr(step_walks, "_Lists", lambda model: built.append(1) or lists(model))
    seen = []

    class Flags(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append((type(model).__name__, all(m.training for m in model.modules())))

        def on_evaluate(self, args, state, control, model=None, **kw):
            seen.append(("eval", not any(m.training for m in model.modules())))

    cfg = small_config(tmp_path / "run", train={"max_steps": 4, "eval_every": 2}, eval={"during_training_limit": 4})
    fit(cfg, callbacks=[Flags()])
    assert [name[:9] for name, _ in seen] == ["LeanWalks", "LeanWalks", "eval", "LeanWalks", "LeanWalks", "eval"]
    assert all(as_expected for _, as_expected in seen)
    assert built == [1]


def test_train_flat_walks_0_takes_torchs_walks_at_each_call(models, monkeypatch):
    """TRAIN_FLAT_WALKS=0 (the bench alternates it): each call walks as torch does, the clip's list is walked anew."""
    from train.kernels.fused_lora import FusedLinear4bit

    _, ours = models
    calls = []
    train = FusedLinear4bit.train
    monkeypatch.setattr(FusedLinear4bit, "train", lambda self, mode=True: calls.append(mode) or train(self, mode))
    ours.train()
    assert calls == []  # flat: each member's train() is not called (its group is settled directly)
    monkeypatch.setenv("TRAIN_FLAT_WALKS", "0")
    ours.eval()
    assert calls and not any(calls) and not any(_flags(ours))
    walks = []
    params = ours.parameters
    ours.parameters = lambda *a, **k: walks.append(1) or params(*a, **k)
    assert step_walks.parameters(ours) == list(params()) and walks == [1]
