"""The memory-lean LoRA dropout (train/lora.py) computes what peft's dropout -> lora_A computes,
gradients included, while saving fewer bytes for the backward."""

import copy

import pytest
import torch

from train.kernels.dropout import LeanDropoutLinear
from train.lora import use_lean_dropout


def _pair(p, dtype):
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 8, bias=False)
    lean = copy.deepcopy(ref)
    lean.__class__ = LeanDropoutLinear
    lean.dropout_p = p
    x = torch.randn(3, 5, 64, dtype=dtype)
    return ref.to(dtype), lean.to(dtype), x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_dropout_then_linear(dtype):
    ref, lean, x = _pair(0.3, dtype)
    xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    yr = ref(torch.nn.functional.dropout(xr, 0.3, True))
    torch.manual_seed(1)
    yl = lean(xl)
    torch.manual_seed(99)  # the backward must replay the forward's mask, not draw a new one
    g = torch.randn_like(yr)
    yr.backward(g)
    yl.backward(g)
    assert torch.equal(yr, yl)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(xl.grad, xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(lean.weight.grad, ref.weight.grad, atol=tol, rtol=tol)
    assert (yr != ref(xr)).any()  # the dropout really dropped something


def test_eval_mode_and_p0_are_plain_linear():
    ref, lean, x = _pair(0.3, torch.float32)
    lean.eval()
    assert torch.equal(lean(x), ref(x))
    lean.train()
    lean.dropout_p = 0.0
    assert torch.equal(lean(x), ref(x))


def _tiny_peft(dropout, use_dora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=use_dora,
                      init_lora_weights=False)  # B != 0, so A's gradient is not trivially zero
    return get_peft_model(base, lora)


def _loss_and_grads(model, ids, checkpointing):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_gradients_match_peft(checkpointing):
    """Whole model, with and without reentrant checkpointing (its recompute must replay the same masks)."""
    ref = _tiny_peft(0.2)
    lean = copy.deepcopy(ref)
    assert use_lean_dropout(lean) == 14  # 7 linears x 2 layers
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    loss_r, grads_r = _loss_and_grads(ref, ids, checkpointing)
    loss_l, grads_l = _loss_and_grads(lean, ids, checkpointing)
    assert torch.equal(loss_r, loss_l)
    assert grads_r.keys() == grads_l.keys() and any("lora_A" in n for n in grads_l)
    for name in grads_r:
        torch.testing.assert_close(grads_l[name], grads_r[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ref.state_dict().keys() == lean.state_dict().keys()  # adapters save and load as before


def _saved_bytes(model, ids):
    """Bytes autograd keeps for the backward, each storage counted once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


def test_saves_fewer_bytes():
    ref = _tiny_peft(0.2)
    lean = copy.deepcopy(ref)
    use_lean_dropout(lean)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with_copies, without = _saved_bytes(ref, ids), _saved_bytes(lean, ids)
    # per layer and token: the dropout copies (4 B fp32) + bool masks of the inputs of 7 linears
    per_token = (3 * 64 + 64 + 2 * 64 + 128) * (4 + 1) * 2
    assert with_copies - without == pytest.approx(per_token * ids.numel(), rel=0.05)


def test_skips_dora_and_zero_dropout():
    assert use_lean_dropout(_tiny_peft(0.0)) == 0
    assert use_lean_dropout(_tiny_peft(0.1, use_dora=True)) == 0
