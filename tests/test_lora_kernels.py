"""The Triton LoRA-dropout kernels (train/kernels/lora_kernels.py), run by Triton's CPU interpreter in fp16 (it
has no bf16; the GPU compiles the same kernels, and scripts/bench.py checks them there in bf16)."""

import pytest
import torch

from train.kernels import lora_kernels as K

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    """conftest.py sets TRITON_INTERPRET=1 before triton is imported: the kernels run on CPU."""
    assert K.interpreting()


def _data(m=130, n=200, r=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g).half()
    a = (torch.randn(r, n, generator=g) * 0.1).half()
    gh = torch.randn(m, r, generator=g).half()
    return x, a, gh


def test_mask_keeps_1_minus_p_and_depends_on_seed_only(interpreted):
    m1 = K.keep_mask((130, 200), 1234, 0.3, "cpu")
    assert m1.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert torch.equal(m1, K.keep_mask((130, 200), 1234, 0.3, "cpu"))  # replayable: forward, recompute, backward
    other = K.keep_mask((130, 200), 1235, 0.3, "cpu")
    assert (other != m1).float().mean().item() == pytest.approx(2 * 0.3 * 0.7, abs=0.02)  # independent draws
    k = m1.float()  # neighbours (next column, next row) are independent: P(both kept) = 0.7 ** 2
    assert (k[:, 1:] * k[:, :-1]).mean().item() == pytest.approx(0.49, abs=0.02)
    assert (k[1:] * k[:-1]).mean().item() == pytest.approx(0.49, abs=0.02)
    rare = K.keep_mask((256, 256), 7, 0.05, "cpu")  # the recipe's p: 5% dropped, give or take 4 sigma
    assert (~rare).float().mean().item() == pytest.approx(0.05, abs=4 * (0.05 * 0.95 / 256**2) ** 0.5)


@pytest.mark.parametrize("r", [16, 32])
def test_kernels_match_torch_with_the_same_mask(interpreted, r):
    x, a, gh = _data(r=r)
    p, seed = 0.3, 77
    keep = K.keep_mask(tuple(x.shape), seed, p, "cpu")
    dropped = x.float() * keep / (1 - p)
    torch.testing.assert_close(K.lora_a_forward(x, a, seed, p).float(), dropped @ a.float().t(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(K.lora_a_grad(x, gh, seed, p), gh.float().t() @ dropped, atol=2e-2, rtol=1e-3)
    gx = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).half()
    want = gx.float() + (gh.float() @ a.float()) * keep / (1 - p)
    torch.testing.assert_close(K.lora_x_grad_(gx, gh, a, seed, p).float(), want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("split, n", [(1, 1000), (3, 2500), (14, 4096)])
def test_split_sum_adds_in_order_and_casts_in_one_pass(interpreted, split, n):
    """split_sum: the partial sums added in fp32 in split order, stored in the dtype asked for (one launch where
    torch takes a sum and a cast); n need not be a multiple of the block."""
    part = torch.randn(split, n, generator=torch.Generator().manual_seed(split)) * 100
    want = part[0].clone()
    for s in range(1, split):
        want += part[s]
    assert torch.equal(K.split_sum(part, torch.float32), want)
    assert torch.equal(K.split_sum(part, torch.float16), want.half())
    assert torch.equal(K.split_sum(part.view(split, 10, n // 10) if n % 10 == 0 else part, torch.float16).flatten(),
                       want.half())


def test_a_grad_in_the_weights_dtype_is_the_fp32_result_cast(interpreted):
    """lora_a_grad(dtype=A's dtype): exactly the fp32 gradient cast once, for a group of three (the caller takes
    each member's rows as views instead of casting each)."""
    x, _, _ = _data()
    gh = torch.randn(x.shape[0], 48, generator=torch.Generator().manual_seed(3)).half()
    full = K.lora_a_grad(x, gh, 77, 0.3, members=3)
    assert full.dtype == torch.float32 and full.shape == (48, x.shape[1])
    assert torch.equal(K.lora_a_grad(x, gh, 77, 0.3, members=3, dtype=torch.float16), full.half())


def test_usable_only_where_it_runs(interpreted):
    x, a, _ = _data()
    assert K.usable(x, a)
    assert not K.usable(x.bfloat16(), a.bfloat16())  # the interpreter has no bf16 (the GPU does)
    assert not K.usable(x, a[:8])  # rank 8: tl.dot needs 16; the torch path takes it
    assert not K.usable(x.float(), a.float())


def test_fused_layer_with_kernels_matches_reference(interpreted, monkeypatch):
    """The fused QLoRA Function on the kernel path: output and every gradient against plain autograd over
    the same 4-bit weight and the kernels' own mask."""
    import bitsandbytes as bnb

    from train.kernels import fused_lora

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(200, 96, bias=False, compute_dtype=torch.float16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(96, 200) * 0.05, requires_grad=False, quant_type="nf4").to("cpu")
    qs = base.weight.quant_state
    dense = bnb.functional.dequantize_4bit(base.weight, qs).float()
    x, a, _ = _data()
    b = (torch.randn(96, 16) * 0.1).half()
    p, scale, seed = 0.25, 2.0, 4321
    monkeypatch.setattr(K, "new_seed", lambda: seed)
    xs, a_, b_ = (t.clone().requires_grad_(True) for t in (x, a, b))
    (y,) = fused_lora._QLoraGroup.apply(xs, (((base.weight, qs, None, scale),), p, True, True), a_, b_)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).half()
    y.backward(dy)
    keep = K.keep_mask(tuple(x.shape), seed, p, "cpu")
    xr, ar, br = (t.float().requires_grad_(True) for t in (x, a, b))
    yr = xr @ dense.t() + scale * ((xr * keep / (1 - p)) @ ar.t()) @ br.t()
    yr.backward(dy.float())
    for name, got, want in (("y", y, yr), ("grad x", xs.grad, xr.grad), ("grad A", a_.grad, ar.grad),
                            ("grad B", b_.grad, br.grad)):
        torch.testing.assert_close(got.float(), want.detach(), atol=3e-2, rtol=2e-2, msg=name)


def test_fused_module_on_kernel_path_with_bias_and_checkpointing(interpreted, monkeypatch):
    """The whole FusedLinear4bit module on the kernel path: a biased 4-bit layer (as Qwen's q/k/v) wrapped
    by peft, run plainly and under reentrant checkpointing. The recompute must draw the same seed (the
    checkpoint restores the CPU RNG), and both runs must equal fp32 autograd with the kernels' mask."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from torch.utils.checkpoint import checkpoint

    from train import lora
    from train.kernels import fused_lora

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(200, 96, bias=True, compute_dtype=torch.float16, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = One()
    net.proj.weight = bnb.nn.Params4bit(torch.randn(96, 200) * 0.05, requires_grad=False, quant_type="nf4").to("cpu")
    net.proj.bias = torch.nn.Parameter(torch.randn(96).half() * 0.1, requires_grad=False)
    net.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: peft then wraps bitsandbytes' layer
    model = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.25, target_modules=["proj"]))
    lora.use_fused_kernels(model, triton_dropout=True)
    layer = model.base_model.model.proj
    assert isinstance(layer, fused_lora.FusedLinear4bit)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = (torch.randn_like(p) * 0.1).half()
    seeds = []
    draw = K.new_seed
    monkeypatch.setattr(K, "new_seed", lambda: seeds.append(draw()) or seeds[-1])
    x = torch.randn(3, 40, 200, generator=torch.Generator().manual_seed(1)).half()
    dy = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(2)).half()
    a_w, b_w = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def run(use_checkpoint):
        model.zero_grad(set_to_none=True)
        seeds.clear()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = checkpoint(model, xi, use_reentrant=True) if use_checkpoint else model(xi)
        y.backward(dy)
        return [y.detach(), xi.grad, a_w.grad.clone(), b_w.grad.clone()], list(seeds)

    plain, plain_seeds = run(False)
    ckpt, ckpt_seeds = run(True)
    assert len(plain_seeds) == 1 and ckpt_seeds == plain_seeds * 2  # first forward and recompute: one seed
    for got, want in zip(ckpt, plain):
        assert torch.equal(got, want)
    keep = K.keep_mask((120, 200), plain_seeds[0], 0.25, "cpu").view(x.shape)
    dense = bnb.functional.dequantize_4bit(layer.get_base_layer().weight, layer.get_base_layer().weight.quant_state)
    xr, ar, br = (t.detach().float().requires_grad_(True) for t in (x, a_w, b_w))
    yr = xr @ dense.float().t() + layer.get_base_layer().bias.float() + 2.0 * ((xr * keep / 0.75) @ ar.t()) @ br.t()
    yr.backward(dy.float())
    for name, got, want in zip(("y", "grad x", "grad A", "grad B"), plain, (yr, xr.grad, ar.grad, br.grad)):
        torch.testing.assert_close(got.float(), want.detach(), atol=3e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("members", [2, 3])
def test_group_kernels_give_each_member_its_own_mask(interpreted, members):
    """A group's kernels (one launch for q/k/v or gate/up): member j's columns, rows and input-gradient term are what
    its own mask (seed member_seed(seed, j)) gives, and the masks of two members differ."""
    x, _, _ = _data()
    g = torch.Generator().manual_seed(11)
    r = 16
    a = (torch.randn(members * r, x.shape[1], generator=g) * 0.1).half()
    gh = torch.randn(x.shape[0], members * r, generator=g).half()
    p, seed = 0.3, 2024
    keeps = [K.keep_mask(tuple(x.shape), K.member_seed(seed, j), p, "cpu") for j in range(members)]
    assert K.member_seed(seed, 0) == seed and not torch.equal(keeps[0], keeps[1])
    dropped = [x.float() * keep / (1 - p) for keep in keeps]
    cols = [slice(j * r, (j + 1) * r) for j in range(members)]
    want_h = torch.cat([d @ a[c].float().t() for d, c in zip(dropped, cols)], 1)
    torch.testing.assert_close(K.lora_a_forward(x, a, seed, p, members).float(), want_h, atol=2e-2, rtol=1e-2)
    want_ga = torch.cat([gh[:, c].float().t() @ d for d, c in zip(dropped, cols)])
    torch.testing.assert_close(K.lora_a_grad(x, gh, seed, p, members), want_ga, atol=2e-2, rtol=1e-3)
    gx = torch.randn(x.shape, generator=g).half()
    want_gx = gx.float() + sum((gh[:, c].float() @ a[c].float()) * keep / (1 - p) for keep, c in zip(keeps, cols))
    torch.testing.assert_close(K.lora_x_grad_(gx, gh, a, seed, p, members).float(), want_gx, atol=3e-2, rtol=1e-2)


def test_fused_group_on_kernel_path_matches_reference(interpreted, monkeypatch):
    """Three 4-bit layers reading one x (q/k/v), one fused Function on the kernel path: every output and gradient
    against fp32 autograd over the same weights and each member's own mask."""
    import bitsandbytes as bnb

    from train.kernels import fused_lora

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    x, _, _ = _data()
    outs = (96, 32, 32)
    layers, dense = [], []
    for n_out in outs:
        w = bnb.nn.Params4bit(torch.randn(n_out, 200, generator=g) * 0.05, requires_grad=False, quant_type="nf4")
        w = w.to("cpu")
        layers.append(w)
        dense.append(bnb.functional.dequantize_4bit(w, w.quant_state).float())
    a_s = [(torch.randn(16, 200, generator=g) * 0.1).half() for _ in outs]
    b_s = [(torch.randn(n, 16, generator=g) * 0.1).half() for n in outs]
    p, scales, seed = 0.25, (2.0, 1.5, 0.5), 99
    monkeypatch.setattr(K, "new_seed", lambda: seed)
    xs = x.clone().requires_grad_(True)
    ab = [t.clone().requires_grad_(True) for t in (*a_s, *b_s)]
    spec = (tuple((w, w.quant_state, None, s) for w, s in zip(layers, scales)), p, True, True)
    ys = fused_lora._QLoraGroup.apply(xs, spec, *ab)
    dys = [torch.randn(y.shape, generator=g).half() for y in ys]
    torch.autograd.backward(ys, dys)
    xr = x.float().requires_grad_(True)
    ref = [t.float().requires_grad_(True) for t in (*a_s, *b_s)]
    yrs = []
    for j, (d, s) in enumerate(zip(dense, scales)):
        keep = K.keep_mask(tuple(x.shape), K.member_seed(seed, j), p, "cpu")
        yrs.append(xr @ d.t() + s * ((xr * keep / (1 - p)) @ ref[j].t()) @ ref[3 + j].t())
    torch.autograd.backward(yrs, [dy.float() for dy in dys])
    checks = [("grad x", xs.grad, xr.grad)] + [(f"y{j}", y, yr) for j, (y, yr) in enumerate(zip(ys, yrs))]
    checks += [(f"grad {j}", t.grad, r_.grad) for j, (t, r_) in enumerate(zip(ab, ref))]
    for name, got, want in checks:
        torch.testing.assert_close(got.float(), want.detach(), atol=3e-2, rtol=2e-2, msg=name)
