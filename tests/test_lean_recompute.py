"""The lean recompute (train/kernels/lean_recompute.py), on the real 4-bit CPU path with LoRA dropout: in every family
it runs on, a checkpointed step's loss and LoRA gradients equal a full recompute's bit for bit while each layer's
down_proj skips its output in the recompute (the skipped outputs are filled with NaN here, so a reader would show);
never in the forward. The families it leaves out are ones whose gradients the skip would change."""

from __future__ import annotations

import copy

import pytest
import torch

from families import FAMILIES, family_config, one_thread  # noqa: F401  (fixture)
from train.kernels import fused_lora, lean_recompute, long_rows

pytestmark = pytest.mark.usefixtures("one_thread")
LEAN = {"llama", "qwen2", "qwen3", "mistral", "phi3"}  # Gemma 2 and 3 normalize the MLP's output before the sum


@pytest.fixture
def poisoned(monkeypatch):
    return poison_skipped(monkeypatch)


def poison_skipped(monkeypatch) -> list:
    """Every output the fused Function skips is NaN (were one read in the forward, the loss would be NaN; in the
    recompute, a gradient would be); returns the list each skip appends its output count to (tests/test_gpu.py too)."""
    skipped = []
    forward = fused_lora._forward

    def poisoning(x, spec, a_list, b_list):
        outs, *rest = forward(x, spec, a_list, b_list)
        if not spec[3]:
            skipped.append(len(outs))
            for out in outs:
                out.fill_(float("nan"))
        return outs, *rest

    monkeypatch.setattr(fused_lora, "_forward", poisoning)
    return skipped


def _models(tmp_path, name):
    from conftest import adapted_nf4

    cfg = family_config(tmp_path / "run", name, lora={"kernel": "fused", "dropout": 0.2})
    full = adapted_nf4(cfg).train()
    full.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # as SFTConfig has it
    full.enable_input_require_grads()
    return full, copy.deepcopy(full)


def _loss_and_grads(model, ids):
    """One checkpointed step's loss and LoRA gradients (checkpointing was turned on by _models: turning it on again
    would replace the layers' checkpoint functions)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _force(model) -> int:
    """The lean recompute on every checkpointed layer, whatever its family (what install refuses for Gemma)."""
    from train import patches
    from train.kernels.offload import checkpointed_layers

    layers = checkpointed_layers(model)
    for layer in layers:
        patches.wrap_checkpoint_function(layer, lean_recompute._lean)
        layer.mlp.down_proj.lean_last = True
    return len(layers)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lean_recompute_changes_no_gradient(tmp_path, name, poisoned):
    full, lean = _models(tmp_path, name)
    layers = full.config.num_hidden_layers
    installed = lean_recompute.install(lean)
    assert installed == (layers if name in LEAN else 0)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    loss_f, grads_f = _loss_and_grads(full, ids)
    assert poisoned == []
    loss_l, grads_l = _loss_and_grads(lean, ids)
    assert poisoned == [1] * installed  # one skip per layer (down_proj alone), in its recompute
    assert torch.equal(loss_l, loss_f) and loss_f.isfinite()
    assert grads_f.keys() == grads_l.keys() and any("down_proj.lora_A" in n for n in grads_f)
    for n in grads_f:
        assert torch.equal(grads_l[n], grads_f[n]), n
    if name not in LEAN:  # what the refusal protects: Gemma's post-MLP norm reads the skipped output
        poisoned.clear()
        assert _force(lean) == layers
        _, forced = _loss_and_grads(lean, ids)
        assert poisoned == [1] * layers
        assert any(not torch.equal(forced[n], grads_f[n]) for n in grads_f)


def test_only_transformers_own_classes_run_lean(tmp_path):
    """A class named like a listed layer elsewhere (remote code) may read the MLP's output: it stays full."""
    full, _ = _models(tmp_path, "llama")
    for layer in full.base_model.model.model.layers:
        layer.__class__ = type("LlamaDecoderLayer", (type(layer),), {"__module__": "transformers_modules.x.modeling"})
    assert lean_recompute.install(full) == 0


def test_installed_when_training_begins_and_switched_off_by_env(tmp_path, monkeypatch):
    """long_rows.install (LongRows.on_train_begin) makes every Llama layer lean once checkpointing is on, once only;
    TRAIN_LEAN_RECOMPUTE=0 leaves them full."""
    from conftest import small_config

    full, lean = _models(tmp_path, "llama")
    cfg = small_config(tmp_path / "run")
    monkeypatch.setenv("TRAIN_LEAN_RECOMPUTE", "0")
    assert long_rows.install(cfg, full)["lean_layers"] == 0
    monkeypatch.delenv("TRAIN_LEAN_RECOMPUTE")
    assert long_rows.install(cfg, lean)["lean_layers"] == lean.config.num_hidden_layers
    funcs = [layer._gradient_checkpointing_func for layer in lean.base_model.model.model.layers]
    assert long_rows.install(cfg, lean)["lean_layers"] == lean.config.num_hidden_layers
    assert [layer._gradient_checkpointing_func for layer in lean.base_model.model.model.layers] == funcs
    lean.gradient_checkpointing_disable()
    assert lean_recompute.install(lean) == 0  # nothing is recomputed: nothing to skip


def test_switch_read_at_each_step(tmp_path, monkeypatch, poisoned):
    """TRAIN_LEAN_RECOMPUTE=0 after install: the next step recomputes in full (the bench alternates it this way)."""
    _, lean = _models(tmp_path, "llama")
    assert lean_recompute.install(lean) == lean.config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("TRAIN_LEAN_RECOMPUTE", "0")
    _loss_and_grads(lean, ids)
    assert poisoned == []
    monkeypatch.setenv("TRAIN_LEAN_RECOMPUTE", "1")
    _loss_and_grads(lean, ids)
    assert poisoned == [1] * lean.config.num_hidden_layers


def test_lean_recompute_inside_the_tiled_mlp(tmp_path, poisoned):
    """With the MLP in token chunks (each its own non-reentrant checkpoint, nested in the layer's), each chunk's
    down_proj skips its output in the layer's recompute and again in the chunk's own replay: gradients equal."""
    from train.kernels import tiled_mlp

    full, lean = _models(tmp_path, "llama")
    for model in (full, lean):
        assert tiled_mlp.install(model, True, tile=16) == model.config.num_hidden_layers
    assert lean_recompute.install(lean) == lean.config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    loss_f, grads_f = _loss_and_grads(full, ids)
    loss_l, grads_l = _loss_and_grads(lean, ids)
    assert poisoned == [1] * 2 * 3 * lean.config.num_hidden_layers  # 40 tokens: chunks of 16, 16 and 8, twice each
    assert torch.equal(loss_l, loss_f) and loss_f.isfinite()
    for n in grads_f:
        assert torch.equal(grads_l[n], grads_f[n]), n
