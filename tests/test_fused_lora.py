"""The fused QLoRA linear (train/kernels/fused_lora.py) computes what peft's LoRA-over-Linear4bit computes,
gradients included, on the real 4-bit CPU path of bitsandbytes, and hands everything else to peft."""

import copy

import pytest
import torch

from conftest import adapted_nf4, small_config
from test_lora_dropout import _loss_and_grads
from train.kernels import fused_lora


def _peft_4bit(tmp_path, compute_dtype="float32", dropout=0.2, kernel="fused", **lora_cfg):
    cfg = small_config(tmp_path / "run", quant={"compute_dtype": compute_dtype},
                       lora={"dropout": dropout, "kernel": kernel, **lora_cfg})
    return adapted_nf4(cfg), cfg


def _fused_layers(peft_model):
    return [m for m in peft_model.modules() if isinstance(m, fused_lora.FusedLinear4bit)]


def _run_layer(layer, cls, x, grad, seed):
    """Forward + backward of one layer as class `cls`; returns output and the gradients."""
    layer.__class__ = cls
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    torch.manual_seed(seed + 1)  # the backward must replay the forward's mask, not draw a new one
    y.backward(grad)
    name = layer.active_adapters[0]
    return y.detach(), x.grad, layer.lora_A[name].weight.grad.clone(), layer.lora_B[name].weight.grad.clone()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_layer_matches_peft(tmp_path, dropout, compute_dtype):
    peft_model, _ = _peft_4bit(tmp_path, compute_dtype, dropout)
    layers = _fused_layers(peft_model)
    assert layers, "no 4-bit LoRA layer got the fused forward"
    layer = layers[0].train()
    dtype = getattr(torch, compute_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, layer.in_features, generator=g).to(dtype)
    grad = torch.randn(2, 7, layer.out_features, generator=g).to(dtype)
    ref = _run_layer(layer, fused_lora.PeftLinear4bit, x, grad, seed=3)
    got = _run_layer(layer, fused_lora.FusedLinear4bit, x, grad, seed=3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # one rounding (addmm) against peft's three in bf16
    for name, r, f in zip(("output", "grad x", "grad A", "grad B"), ref, got):
        torch.testing.assert_close(f, r, atol=tol, rtol=tol, msg=name)
    without_lora = layer.get_base_layer()(x)
    assert not torch.allclose(ref[0], without_lora, atol=tol)  # the adapter term is really in the output


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_loss_and_gradients_match_peft(tmp_path, checkpointing):
    """Whole 4-bit model with dropout; with reentrant checkpointing its recompute replays the same masks."""
    fused, _ = _peft_4bit(tmp_path, "float32", 0.2)
    ref = copy.deepcopy(fused)
    for m in ref.modules():
        if isinstance(m, fused_lora.FusedLinear4bit):
            m.__class__ = fused_lora.PeftLinear4bit
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    results = [_loss_and_grads(m, ids, checkpointing) for m in (ref, fused)]
    (loss_r, grads_r), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    assert grads_r.keys() == grads_f.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)
    assert ref.state_dict().keys() == fused.state_dict().keys()  # adapters save and load as before


def test_everything_else_is_peft(tmp_path):
    """Eval (generation), disabled and merged adapters run peft's own forward, bit for bit."""
    peft_model, _ = _peft_4bit(tmp_path, "float32", 0.2)
    layer = _fused_layers(peft_model)[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))

    def both():
        outs = []
        for cls in (fused_lora.PeftLinear4bit, fused_lora.FusedLinear4bit):
            layer.__class__ = cls
            torch.manual_seed(0)
            with torch.no_grad():
                outs.append(layer(x))
        return outs

    layer.eval()
    ref, got = both()
    assert torch.equal(ref, got)
    layer.train()
    with peft_model.disable_adapter():
        ref, got = both()
    assert torch.equal(ref, got) and torch.equal(got, layer.get_base_layer()(x))


def test_not_installed_for_peft_kernel_dora_or_sharded(tmp_path, monkeypatch):
    assert _fused_layers(_peft_4bit(tmp_path / "a", kernel="peft")[0]) == []
    dora, _ = _peft_4bit(tmp_path / "b", use_dora=True)
    layer = _fused_layers(dora)[0]  # installed, but DoRA is a variant: the plan hands it to peft
    assert layer.fused_plan(torch.zeros(1, layer.in_features), (), {}) is None
    plain, _ = _peft_4bit(tmp_path / "d")
    layer = _fused_layers(plain)[0].train()
    x = torch.zeros(1, layer.in_features)
    assert layer.fused_plan(x, (), {}) is not None
    monkeypatch.setattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", True, raising=False)
    assert layer.fused_plan(x, (), {}) is None  # bitsandbytes' CPU inference layout: only its kernel reads it
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert _fused_layers(_peft_4bit(tmp_path / "c")[0]) == []


class _Same(torch.nn.Module):
    def forward(self, w):
        return w


def test_plan_hands_peft_every_layer_the_function_does_not_compute(tmp_path):
    """fused_plan's refusals, one at a time on a layer it accepts: a trainable base bias, peft's lora_bias on A or B,
    adapter weights of another dtype than x (no autocast), a parametrized weight (no longer a parameter of the
    module), an integer input, extra call arguments, merged or several active adapters, a dropout module it does not
    know."""
    model, _ = _peft_4bit(tmp_path)
    layer = _fused_layers(model)[0].train()
    x = torch.zeros(1, layer.in_features)
    plan = layer.fused_plan(x, (), {})
    assert plan is not None and plan.a is layer.lora_A["default"].weight
    assert plan.weight is layer.get_base_layer().weight and plan.b is layer.lora_B["default"].weight
    a, b, base = layer.lora_A["default"], layer.lora_B["default"], layer.get_base_layer()
    refusals = {
        "trainable base bias": lambda: setattr(base, "bias", torch.nn.Parameter(torch.zeros(layer.out_features))),
        "lora_bias on A": lambda: setattr(a, "bias", torch.nn.Parameter(torch.zeros(a.out_features))),
        "lora_bias on B": lambda: setattr(b, "bias", torch.nn.Parameter(torch.zeros(b.out_features))),
        "B in another dtype": lambda: b.to(torch.float64),
        "merged": lambda: layer.merged_adapters.append("default"),
        "two active adapters": lambda: setattr(layer, "_active_adapter", ["default", "other"]),
        "another dropout": lambda: layer.lora_dropout.__setitem__("default", torch.nn.AlphaDropout(0.1)),
        "a parametrized B": lambda: torch.nn.utils.parametrize.register_parametrization(b, "weight", _Same()),
    }
    for why, change in refusals.items():
        saved = copy.deepcopy(layer)
        change()
        assert layer.fused_plan(x, (), {}) is None, why
        layer = saved
        a, b, base = layer.lora_A["default"], layer.lora_B["default"], layer.get_base_layer()
    assert layer.fused_plan(x, (), {}) is not None
    assert layer.fused_plan(x.long(), (), {}) is None
    assert layer.fused_plan(x, (1,), {}) is None and layer.fused_plan(x, (), {"scale": 1}) is None
    frozen = copy.deepcopy(layer)
    frozen.get_base_layer().bias = torch.nn.Parameter(torch.zeros(layer.out_features), requires_grad=False)
    assert frozen.fused_plan(x, (), {}) is not None  # a frozen base bias is added in the forward (Qwen2's q/k/v)


def test_cached_base_layer_adds_no_state_and_follows_a_copy(tmp_path):
    """The fused layer looks its base layer up once (host time): that adds no submodule or state-dict key, and a
    deep copy of the model uses its own base layer, not the original's."""
    peft_model, _ = _peft_4bit(tmp_path)
    keys, count = set(peft_model.state_dict()), len(list(peft_model.modules()))
    layer = _fused_layers(peft_model)[0].train()
    layer(torch.randn(1, 3, layer.in_features, requires_grad=True)).sum().backward()
    assert layer.base_layer_cached() is layer.get_base_layer()
    assert set(peft_model.state_dict()) == keys and len(list(peft_model.modules())) == count
    twin = _fused_layers(copy.deepcopy(peft_model))[0]
    assert twin.base_layer_cached() is twin.get_base_layer() is not layer.get_base_layer()
    layer.base_layer = twin.get_base_layer()  # a replaced child (transformers' dequantize() does this): followed
    assert layer.base_layer_cached() is twin.get_base_layer()
