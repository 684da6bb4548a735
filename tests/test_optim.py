"""train/optim.py: bitsandbytes' 32-bit AdamW stepping a whole group at once gives bitsandbytes' own results, bit for
bit on CPU (its CPU kernel is the reference arithmetic), keeps its state_dict format, and resumes exactly."""

import io

import bitsandbytes as bnb
import pytest
import torch

from train import optim

SHAPES = [(16, 64), (64, 16), (16, 7000), (7000, 16), (3, 5)]  # 112,000-element tensors: the paged rule's side too


def params(dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(device, dtype)) for s in SHAPES]


def run(opt, ps, steps, start=0):
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + k)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.01
        opt.step()


def state_tensors(opt, ps):
    return [(opt.state[p]["state1"], opt.state[p]["state2"], opt.state[p]["step"]) for p in ps]


def make(cls, ps, **kw):
    return cls(ps, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, optim_bits=32, **kw)


def assert_same(a_opt, a_ps, b_opt, b_ps):
    for pa, pb in zip(a_ps, b_ps):
        assert torch.equal(pa, pb)
    for (a1, a2, an), (b1, b2, bn) in zip(state_tensors(a_opt, a_ps), state_tensors(b_opt, b_ps)):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and an == bn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_step_adamw_equals_bitsandbytes_bit_for_bit(dtype):
    ours_ps, ref_ps = params(dtype), params(dtype)
    ours, ref = make(optim.flat_adamw_class(), ours_ps), make(bnb.optim.AdamW, ref_ps)
    run(ours, ours_ps, 4)
    run(ref, ref_ps, 4)
    assert ours.train_flat, "the one-step path did not run"
    assert_same(ours, ours_ps, ref, ref_ps)
    assert not torch.equal(ours_ps[0], params(dtype)[0])  # it did move the weights


def test_a_tensor_without_gradient_takes_bitsandbytes_path_and_stays_equal():
    ours_ps, ref_ps = params(), params()
    ours, ref = make(optim.flat_adamw_class(), ours_ps), make(bnb.optim.AdamW, ref_ps)
    run(ours, ours_ps, 2)
    run(ref, ref_ps, 2)
    for ps, opt in ((ours_ps, ours), (ref_ps, ref)):  # one step where the last tensor has no gradient
        g = torch.Generator().manual_seed(7)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * 0.01
        ps[-1].grad = None
        opt.step()
    assert ours.state[ours_ps[0]]["step"] == 3 and ours.state[ours_ps[-1]]["step"] == 2
    assert_same(ours, ours_ps, ref, ref_ps)
    run(ours, ours_ps, 1, start=9)  # steps differ now: bitsandbytes' path again, still equal
    run(ref, ref_ps, 1, start=9)
    assert_same(ours, ours_ps, ref, ref_ps)


def test_a_replaced_parameter_storage_is_stepped_where_it_now_lives():
    """The step writes the weights through flat views of each parameter's storage, made once: a parameter whose
    .data was replaced between steps (a reload, model.to()) is stepped in its new storage, as bitsandbytes steps it."""
    ours_ps, ref_ps = params(), params()
    ours, ref = make(optim.flat_adamw_class(), ours_ps), make(bnb.optim.AdamW, ref_ps)
    run(ours, ours_ps, 2)
    run(ref, ref_ps, 2)
    for p in (ours_ps[1], ref_ps[1]):
        p.data = p.data.clone()
    run(ours, ours_ps, 2, start=2)
    run(ref, ref_ps, 2, start=2)
    assert_same(ours, ours_ps, ref, ref_ps)


def test_a_non_contiguous_parameter_takes_bitsandbytes_path_and_stays_equal():
    """A column-major parameter has no flat view: its step is bitsandbytes' own (which makes it contiguous), then the
    one-step path takes over; the results equal bitsandbytes' throughout."""
    ours_ps, ref_ps = params(), params()
    for ps in (ours_ps, ref_ps):
        ps[0].data = ps[0].data.t().contiguous().t()  # same values, column-major
    ours, ref = make(optim.flat_adamw_class(), ours_ps), make(bnb.optim.AdamW, ref_ps)
    run(ours, ours_ps, 1)
    assert not ours.__dict__.get("train_flat") and ours_ps[0].is_contiguous()
    run(ours, ours_ps, 2, start=1)
    assert ours.__dict__.get("train_flat")
    run(ref, ref_ps, 3)
    assert_same(ours, ours_ps, ref, ref_ps)


@pytest.mark.parametrize("source", ["ours", "bitsandbytes"])
def test_resume_from_a_state_dict_equals_the_uninterrupted_run(source):
    """A checkpoint's optimizer state (torch.save, loaded to CPU as Trainer does), ours or bitsandbytes', resumes
    into the one-step AdamW exactly as the uninterrupted run."""
    cls = optim.flat_adamw_class()
    whole_ps = params()
    whole = make(cls, whole_ps)
    run(whole, whole_ps, 5)
    first_ps = params()
    first = make(cls if source == "ours" else bnb.optim.AdamW, first_ps)
    run(first, first_ps, 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed_ps = [torch.nn.Parameter(p.detach().clone()) for p in first_ps]
    resumed = make(cls, resumed_ps)
    resumed.load_state_dict(torch.load(buf, map_location="cpu"))
    run(resumed, resumed_ps, 2, start=3)
    assert resumed.train_flat
    assert_same(resumed, resumed_ps, whole, whole_ps)


@pytest.mark.parametrize("on", [True, False])
def test_trainer_builds_the_one_step_adamw_for_paged_adamw_32bit_only(monkeypatch, on):
    """By default (TRAIN_ONE_STEP_ADAMW=0 turns it off for an A/B), for paged_adamw_32bit only."""
    from transformers import TrainingArguments

    from train.trainer import trainer_class

    if on:
        monkeypatch.delenv(optim.ENV, raising=False)
    else:
        monkeypatch.setenv(optim.ENV, "0")
    cls = trainer_class()
    for name, want in (("paged_adamw_32bit", optim.flat_adamw_class() if on else bnb.optim.AdamW),
                       ("paged_adamw_8bit", bnb.optim.AdamW), ("adamw_torch", torch.optim.AdamW)):
        args = TrainingArguments(output_dir="unused", optim=name, report_to=[])
        got, kwargs = cls.get_optimizer_cls_and_kwargs(args)
        assert got is want, name
