"""GPU checks: what the CPU suite tests through Triton's interpreter, bitsandbytes' CPU kernels and sdpa,
again on CUDA, in bf16, with the kernels the GPU really runs. Run with `bash scripts/gpu_check.sh`
(`pytest -m gpu tests/`); every test here is skipped where CUDA is not available.

- The one-kernel NF4 dequantization (train/kernels/nf4.py), compiled: bit for bit bitsandbytes' own in bf16.
- Triton LoRA-dropout kernels (train/kernels/lora_kernels.py), compiled: the mask equals a plain-torch copy of
  the kernels' hash, keeps 1 - p, and the forward and both backward kernels equal fp64 math with that mask;
  dropout on and off, every supported rank, ragged shapes and one Llama-8B-sized MLP input.
- The fused QLoRA layer (train/kernels/fused_lora.py, lora.kernel fused and fused_triton) on a real NF4 Linear4bit:
  output and gradients equal peft's own modules (lora.kernel: peft), with and without autocast; the whole
  4-bit model's loss and gradients too, with and without reentrant checkpointing (its CUDA RNG replay).
- Padding-free varlen attention (train/kernels/attention.py): per-row losses and LoRA gradients of a packed batch
  equal those of a padded sdpa batch, and the varlen kernel really ran.
- A tiny fit on the default GPU path (bf16 autocast, varlen attention, Liger, Triton dropout, paged AdamW):
  interrupted at step 3 and resumed, it logs the uninterrupted run's per-step losses and saves its adapter.
"""

from __future__ import annotations

import functools

import pytest
import torch

from train.kernels import lora_kernels as K

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bash scripts/gpu_check.sh)")]


def on_gpu(test):
    for mark in gpu:
        test = mark(test)
    return test


def compiled_triton() -> None:
    """Skip unless Triton compiles for the GPU in this session (conftest.py keeps its CPU interpreter on
    for every run but `pytest -m gpu` on a CUDA machine)."""
    if K.triton_module() is None:
        pytest.skip("triton is not installed")
    if K.interpreting():
        pytest.skip("Triton runs in its CPU interpreter in this session (TRITON_INTERPRET=1): "
                    "run `pytest -m gpu` (bash scripts/gpu_check.sh)")


# ---------------------------------------------------------------- the reference dropout mask

def reference_keep(shape: tuple[int, int], seed: int, p: float, device) -> torch.Tensor:
    """train/kernels/_lora_triton.py's _keep in plain torch int64 arithmetic: the mask the kernels must apply."""
    m, n = shape
    low = 0xFFFFFFFF

    def mul(x, c):  # (x * c) mod 2**32, in halves so int64 never overflows
        return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & low

    x = torch.arange(m * n, device=device, dtype=torch.int64).view(m, n)
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = x ^ K.mix(seed)
    x = mul(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 8) >= K._threshold(p)


def test_reference_mask_is_the_interpreted_kernels_mask():
    """CPU (Triton's interpreter): the reference above is the kernels' mask, so the GPU tests can trust it."""
    pytest.importorskip("triton")
    if not K.interpreting():
        pytest.skip("needs Triton's CPU interpreter (any run but `pytest -m gpu` on a GPU)")
    for shape, seed, p in (((130, 200), 1234, 0.3), ((64, 64), 7, 0.05), ((5, 300), 2**31 - 2, 0.5)):
        assert torch.equal(reference_keep(shape, seed, p, "cpu"), K.keep_mask(shape, seed, p, "cpu"))


# ---------------------------------------------------------------- (a) the Triton kernels, compiled

def check_kernels(m: int, n: int, r: int, p: float, device="cuda", dtype=torch.bfloat16, seed: int = 4242) -> None:
    """The three kernels against fp64 math with the reference mask (device/dtype: cpu/fp16 under the
    interpreter runs the same checks)."""
    from test_lora_kernels import _data

    x, a, gh = (t.to(device, dtype) for t in _data(m, n, r, seed=r))
    tol = {"atol": 2e-2, "rtol": 1.6e-2} if dtype == torch.bfloat16 else {"atol": 2e-2, "rtol": 1e-2}
    assert K.usable(x, a)
    keep = reference_keep((m, n), seed, p, device)
    assert torch.equal(K.keep_mask((m, n), seed, p, device), keep)  # compiled hash == reference hash
    assert keep.double().mean().item() == pytest.approx(1 - p, abs=max(5 * (p * (1 - p) / (m * n)) ** 0.5, 1e-9))
    dropped = x.double() * keep / (1 - p)

    h = K.lora_a_forward(x, a, seed, p)
    assert h.dtype == dtype and h.shape == (m, r)
    torch.testing.assert_close(h.double(), dropped @ a.double().t(), **tol, msg="lora_a_forward")
    assert torch.equal(K.lora_a_forward(x, a, seed, p), h)  # deterministic: a checkpointed recompute matches

    grad_a = K.lora_a_grad(x, gh, seed, p)
    assert grad_a.dtype == torch.float32 and grad_a.shape == (r, n)
    # fp32 out: only fp32 accumulation error
    torch.testing.assert_close(grad_a.double(), gh.double().t() @ dropped, atol=1e-3, rtol=1e-4, msg="lora_a_grad")
    assert torch.equal(K.lora_a_grad(x, gh, seed, p, dtype=dtype), grad_a.to(dtype))  # the A weights' dtype: one cast

    gx = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    want = gx.double() + (gh.double() @ a.double()) * keep / (1 - p)
    got = K.lora_x_grad_(gx, gh, a, seed, p)
    assert got is gx  # in place
    torch.testing.assert_close(got.double(), want, **tol, msg="lora_x_grad_")
    if p > 0:  # a kernel that ignored the mask would also match dropped-free math: it must not
        assert not torch.allclose(h.double(), x.double() @ a.double().t(), **tol)


@on_gpu
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("r", K.RANKS)
def test_triton_kernels_match_reference_math_bf16(r, p):
    compiled_triton()
    # ragged for BM=64, three CHUNK=1024 forward chunks, three partial sums in lora_a_grad
    check_kernels(1520, 2128, r, p)


def check_group_kernels(m: int, n: int, r: int, p: float, members: int, seed: int = 777) -> None:
    """The group kernels (one launch for q/k/v or gate/up) against fp64 math with each member's reference mask."""
    g = torch.Generator().manual_seed(members)
    x = torch.randn(m, n, generator=g).cuda().bfloat16()
    a = (torch.randn(members * r, n, generator=g) * 0.1).cuda().bfloat16()
    gh = torch.randn(m, members * r, generator=g).cuda().bfloat16()
    tol = {"atol": 2e-2, "rtol": 1.6e-2}
    keeps = [reference_keep((m, n), K.member_seed(seed, j), p, "cuda") for j in range(members)]
    assert all(not torch.equal(keeps[0], k) for k in keeps[1:])  # each member its own mask
    cols = [slice(j * r, (j + 1) * r) for j in range(members)]
    dropped = [x.double() * keep / (1 - p) for keep in keeps]
    h = K.lora_a_forward(x, a, seed, p, members)
    want = torch.cat([d @ a[c].double().t() for d, c in zip(dropped, cols)], 1)
    torch.testing.assert_close(h.double(), want, **tol, msg="lora_a_forward, group")
    grad_a = K.lora_a_grad(x, gh, seed, p, members)
    want = torch.cat([gh[:, c].double().t() @ d for d, c in zip(dropped, cols)])
    torch.testing.assert_close(grad_a.double(), want, atol=1e-3, rtol=1e-4, msg="lora_a_grad, group")
    gx = torch.randn(m, n, generator=g).cuda().bfloat16()
    want = gx.double() + sum((gh[:, c].double() @ a[c].double()) * keep / (1 - p) for keep, c in zip(keeps, cols))
    torch.testing.assert_close(K.lora_x_grad_(gx, gh, a, seed, p, members).double(), want, **tol,
                               msg="lora_x_grad_, group")


@on_gpu
@pytest.mark.parametrize("members", [2, 3])
def test_group_kernels_match_reference_math_bf16(members):
    compiled_triton()
    check_group_kernels(1520, 2128, 16, 0.3, members)
    check_group_kernels(4099, 4096, 32, 0.05, members, seed=2**31 - 2)  # Llama's q/k/v input width, the top seed


@on_gpu
def test_triton_kernels_at_llama_8b_mlp_width():
    """One down_proj input of the 8B benchmark (8192 tokens x 14336): 14 forward chunks, 16 partial sums."""
    compiled_triton()
    check_kernels(8192, 14336, 16, 0.05, seed=99)


@on_gpu
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_kernel_equals_bitsandbytes_bit_for_bit(nested):
    """train/kernels/nf4.py compiled: bf16 weights of Llama-8B shapes (and one ragged) equal bitsandbytes'
    dequantize_4bit exactly, double quant on and off."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from train.kernels import nf4

    compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(3)
    for shape in ((4096, 4096), (14336, 4096), (1024, 4096), (200, 96)):
        w = (torch.randn(shape, device="cuda", generator=g) * 0.02).bfloat16()
        packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        assert nf4.usable(packed, qs, torch.bfloat16)
        assert torch.equal(nf4.dequantize(packed, qs, torch.bfloat16), dequantize_4bit(packed, qs)), shape


@on_gpu
def test_direct_relaunch_equals_tritons_own_launch(monkeypatch):
    """train/kernels/launch.py: relaunching the compiled kernels gives exactly what Triton's own launch gives, across
    what Triton specializes on (token counts divisible by 16 or not, a row view that is not 16-byte aligned, seeds,
    ranks), and the direct path did run: each kernel's own launcher, called as patches.triton_launcher says."""
    from bitsandbytes.functional import quantize_4bit

    from train import patches
    from train.kernels import launch, nf4

    compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(5)
    packed, qs = quantize_4bit((torch.randn(1024, 4096, device="cuda", generator=g) * 0.02).bfloat16(),
                               blocksize=64, compress_statistics=True, quant_type="nf4")
    base = torch.randn(1601, 4096, device="cuda", generator=g).bfloat16()
    shifted = base.view(-1)[1:1 + 1600 * 4096].view(1600, 4096)  # a contiguous view 2 bytes off alignment
    cases = [(base[:1520], 16, 11), (shifted, 16, 12), (base[:1536], 32, 16), (base[:1520], 16, 11)]

    def run_all() -> list:
        outs = [nf4.dequantize(packed, qs, torch.bfloat16) for _ in range(2)]
        for x, r, seed in cases:
            a_gen, gh_gen = torch.Generator("cuda").manual_seed(r), torch.Generator("cuda").manual_seed(seed)
            a = (torch.randn(r, 4096, device="cuda", generator=a_gen) * 0.02).bfloat16()
            gh = torch.randn(x.shape[0], r, device="cuda", generator=gh_gen).bfloat16()
            gx = torch.ones_like(x)
            outs += [K.lora_a_forward(x, a, seed, 0.1), K.lora_a_grad(x, gh, seed, 0.1),
                     K.lora_x_grad_(gx, gh, a, seed, 0.1)]
        return outs

    monkeypatch.setattr(launch, "DIRECT", False)
    want = run_all()
    monkeypatch.setattr(launch, "DIRECT", True)
    kernels = [nf4._kernel(), *(k for k in K._kernels().values() if hasattr(k, "direct"))]
    before = sum(k.direct for k in kernels)
    run_all()  # compiles or caches each signature on first sight
    got = run_all()
    assert patches._triton_launch_ok()  # this Triton's launch call is the one train/patches.py makes
    assert sum(k.direct for k in kernels) - before >= len(want)  # the second pass called every kernel's launcher
    for i, (w, o) in enumerate(zip(want, got)):
        assert torch.equal(w, o), i


# ---------------------------------------------------------------- (b) fused layer vs peft on NF4

class _MaskDropout(torch.nn.Module):
    """In peft's dropout slot: a given keep mask, so that peft's modules apply the Triton kernels' dropout."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.view(x.shape).to(x.dtype) / (1 - self.p)


def _copy_lora(src, dst) -> None:
    params = dict(dst.named_parameters())
    names = [n for n, _ in src.named_parameters() if "lora_" in n]
    assert names and all(n in params for n in names)
    for name, p in src.named_parameters():
        if "lora_" in name:
            params[name].data = p.data.clone()


def fused_and_peft(tmp_path, compute_dtype: str, dropout: float, kernel: str, **lora_cfg):
    """The tiny 4-bit model twice, the same base and LoRA weights: lora.kernel=`kernel`, and peft's modules."""
    from test_fused_lora import _peft_4bit
    from train import lora

    fused, cfg = _peft_4bit(tmp_path / "fused", compute_dtype, dropout, kernel=kernel, **lora_cfg)
    ref, _ = _peft_4bit(tmp_path / "peft", compute_dtype, dropout, kernel="peft", **lora_cfg)
    if compute_dtype == "bfloat16":
        for m in (fused, ref):
            lora.match_training_dtypes(m, cfg.quant)  # TRL trains a 4-bit base's LoRA weights in bf16
    elif compute_dtype == "float16":  # (CPU runs of these checks: the interpreter has no bf16)
        for m in (fused, ref):
            for name, p in m.named_parameters():
                if "lora_" in name:
                    p.data = p.data.half()
    _copy_lora(fused, ref)
    return fused.train(), ref.train()


def exact_layer(layer, x, grad, keep, p):
    """The LoRA layer's output and gradients in fp64 from the same (16-bit) inputs, NF4 weight and mask."""
    from bitsandbytes.functional import dequantize_4bit

    base = layer.get_base_layer()
    w = dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    xd, a, b = (t.detach().double().requires_grad_(True)
                for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    dropped = xd if keep is None else xd * keep.view(x.shape) / (1 - p)
    y = xd @ w.t() + layer.scaling["default"] * (dropped @ a.t()) @ b.t()
    if base.bias is not None:
        y = y + base.bias.double()
    y.backward(grad.double())
    return y.detach(), xd.grad, a.grad, b.grad


def assert_as_accurate(got, peft, exact, msg) -> None:
    """16-bit results of two differently rounded computations of the same math: the fused one no further
    from the fp64 result than twice peft's own error (FlashAttention's test criterion), and peft's error a
    bf16-sized one (so the fp64 reference is the same math)."""
    scale = exact.abs().max().item()
    err_got = (got.double() - exact).abs().max().item()
    err_peft = (peft.double() - exact).abs().max().item()
    assert err_peft <= 2e-2 * scale, f"{msg}: peft vs fp64 {err_peft:.3g} (max |value| {scale:.3g})"
    assert err_got <= 2 * err_peft + 1e-3 * scale, f"{msg}: fused vs fp64 {err_got:.3g}, peft vs fp64 {err_peft:.3g}"


def check_fused_layers(tmp_path, monkeypatch, kernel: str, dropout: float, device="cuda",
                       dtype=torch.bfloat16, autocasts=(False, True)) -> None:
    from test_fused_lora import _fused_layers, _run_layer
    from train.kernels import fused_lora

    # groups off: each layer is called here on its own input, where a group member would draw its group's mask
    # (tests/test_lora_group.py and test_grouped_layers_equal_layers_alone_on_cuda check groups against this)
    fused, ref = fused_and_peft(tmp_path, str(dtype).removeprefix("torch."), dropout, kernel, r=16, alpha=32,
                                groups=False)
    layers = {name: m for name, m in fused.named_modules() if isinstance(m, fused_lora.FusedLinear4bit)}
    assert len(layers) == len(_fused_layers(fused)) > 0
    ref_layers = dict(ref.named_modules())
    seeds = []
    monkeypatch.setattr(K, "new_seed", lambda: seeds.append(1000 + len(seeds)) or seeds[-1])
    checked = 0
    for name, layer in layers.items():
        if ".layers.0." not in name:
            continue
        peft_layer = ref_layers[name]
        assert type(peft_layer) is fused_lora.PeftLinear4bit and type(peft_layer.lora_A["default"]) is torch.nn.Linear
        assert torch.equal(layer.get_base_layer().weight, peft_layer.get_base_layer().weight)  # the same NF4 bytes
        g = torch.Generator().manual_seed(checked)
        x = torch.randn(4, 33, layer.in_features, generator=g).to(device, dtype)
        grad = torch.randn(4, 33, layer.out_features, generator=g).to(device, dtype)
        for autocast in autocasts:
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
                assert layer.fused_plan(x, (), {}) is not None, f"{name}: the fused forward must run, not peft's"
                seeds.clear()
                got = _run_layer(layer, fused_lora.FusedLinear4bit, x, grad, seed=3)
                kernel_path = kernel == "fused_triton" and dropout > 0
                assert len(seeds) == (1 if kernel_path else 0), "the Triton dropout ran iff lora.kernel=fused_triton"
                rows = (x[..., 0].numel(), x.shape[-1])
                if kernel_path:  # peft's modules with the kernels' mask in its dropout slot
                    keep = reference_keep(rows, seeds[0], dropout, device)
                    peft_layer.lora_dropout["default"] = _MaskDropout(keep, dropout)
                elif dropout > 0:  # torch's mask, drawn again from the same RNG state (seed=3 below)
                    torch.manual_seed(3)
                    keep = torch.native_dropout(torch.ones(rows, device=device, dtype=dtype), dropout, True)[1]
                else:
                    keep = None
                want = _run_layer(peft_layer, fused_lora.PeftLinear4bit, x, grad, seed=3)
            exact = exact_layer(peft_layer, x, grad, keep, dropout)
            for what, w, f, e in zip(("output", "grad x", "grad A", "grad B"), want, got, exact):
                assert f.dtype == w.dtype
                assert_as_accurate(f, w, e, f"{name} {what} (autocast={autocast})")
            if dropout > 0:  # negative control: without the dropout, the criterion fails
                saved = peft_layer.lora_dropout["default"]
                peft_layer.lora_dropout["default"] = torch.nn.Identity()
                undropped = _run_layer(peft_layer, fused_lora.PeftLinear4bit, x, grad, seed=3)
                peft_layer.lora_dropout["default"] = saved
                for i in (0, 2):  # output, grad A
                    with pytest.raises(AssertionError):
                        assert_as_accurate(undropped[i], want[i], exact[i], "no dropout")
        checked += 1
    assert checked == 7  # q, k, v, o, gate, up, down of the first decoder layer


@on_gpu
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("kernel", ["fused", "fused_triton"])
def test_fused_layer_matches_peft_on_nf4_cuda(tmp_path, monkeypatch, kernel, dropout):
    if kernel == "fused_triton":
        compiled_triton()
    check_fused_layers(tmp_path, monkeypatch, kernel, dropout)


def check_fused_model(tmp_path, checkpointing: bool, device="cuda") -> None:
    """Whole 4-bit model in fp32, dropout 0.2: loss and every LoRA gradient, fused against peft's modules."""
    from test_lora_dropout import _loss_and_grads

    fused, ref = fused_and_peft(tmp_path, "float32", 0.2, "fused")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3)).to(device)
    loss_r, grads_r = _loss_and_grads(ref, ids, checkpointing)
    loss_f, grads_f = _loss_and_grads(fused, ids, checkpointing)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    assert grads_r.keys() == grads_f.keys() and len(grads_r) == 2 * 7 * 4  # A and B of 7 linears x 4 layers
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.manual_seed(6)  # other masks: another loss (the masks above were the same draw, not no dropout)
    with torch.no_grad():
        other = fused(input_ids=ids, labels=ids).loss
    assert abs(other.item() - loss_f.item()) > 1e-4


@on_gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_matches_peft_on_cuda(tmp_path, checkpointing):
    check_fused_model(tmp_path, checkpointing)


@on_gpu
def test_grouped_layers_equal_layers_alone_on_cuda(tmp_path, monkeypatch):
    """lora.kernel=fused_triton in bf16 with dropout on the tiny 4-bit model: q/k/v and gate/up as groups (one Function,
    the group kernels) against every layer alone, given the seeds that make the masks the same."""
    from test_fused_lora import _peft_4bit
    from test_lora_dropout import _loss_and_grads
    from train import lora

    compiled_triton()
    models = {}
    for groups in (True, False):
        models[groups], cfg = _peft_4bit(tmp_path / str(groups), "bfloat16", 0.3, kernel="fused_triton", groups=groups,
                                         r=16, alpha=32)  # a rank the kernels take (K.RANKS)
        lora.match_training_dtypes(models[groups], cfg.quant)
    _copy_lora(models[True], models[False])
    layers = models[True].config.num_hidden_layers
    drawn = [1000 + 7 * i for i in range(4 * layers)]  # one seed per group or lone layer: q/k/v, o, gate/up, down
    alone = []
    for i in range(layers):
        q, o, gate, down = drawn[4 * i:4 * i + 4]
        alone += [q, K.member_seed(q, 1), K.member_seed(q, 2), o, gate, K.member_seed(gate, 1), down]
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    results = {}
    for groups, seeds in ((True, drawn), (False, alone)):
        it = iter(seeds)
        monkeypatch.setattr(K, "new_seed", lambda: next(it))
        results[groups] = _loss_and_grads(models[groups].train(), ids, checkpointing=False)
        assert next(it, None) is None, "every seed drawn: each layer's dropout ran on the kernel path"
    (loss_g, grads_g), (loss_a, grads_a) = results[True], results[False]
    torch.testing.assert_close(loss_g, loss_a, atol=2e-3, rtol=2e-3)
    assert grads_g.keys() == grads_a.keys() and len(grads_g) == 2 * 7 * layers
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        assert (grads_g[name] - grads_a[name]).abs().max().item() <= 2e-2 * scale + 1e-6, name




@on_gpu
def test_liger_relaunch_equals_tritons_own_launch(monkeypatch):
    """train/kernels/liger_launch.py: Liger's RMSNorm, RoPE and SiLU-mul (forward and backward, at Llama-8B widths, two
    token counts) relaunched directly give exactly what Triton's own launches give, and the relaunch path did run."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    from train.kernels import liger_launch

    liger_launch.install()

    def run(tokens):
        g = torch.Generator(device="cuda").manual_seed(tokens)
        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        x, w = rand(tokens, 4096), rand(4096)
        q, k = rand(1, 32, tokens, 128), rand(1, 8, tokens, 128)
        cos, sin = rand(1, tokens, 128).detach(), rand(1, tokens, 128).detach()
        a, b = rand(tokens, 14336), rand(tokens, 14336)
        outs = [LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False), *LigerRopeFunction.apply(q, k, cos, sin),
                LigerSiLUMulFunction.apply(a, b)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return [t.detach().clone() for t in (*outs, x.grad, w.grad, q.grad, k.grad, a.grad, b.grad)]

    monkeypatch.setenv("TRAIN_LIGER_RELAUNCH", "0")
    want = [run(n) for n in (1000, 4096)]
    monkeypatch.setenv("TRAIN_LIGER_RELAUNCH", "1")
    run(1000), run(4096)  # first launches of each signature: compiled, through Triton
    import importlib

    from train import patches

    wrappers = [getattr(importlib.import_module(m), n) for m, names in patches.LIGER_KERNELS.items() for n in names]
    before = sum(w.kernel.relaunches for w in wrappers)
    got = [run(n) for n in (1000, 4096)]
    assert sum(w.kernel.relaunches for w in wrappers) > before  # the direct path ran
    for g_, w_ in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g_, w_))

@on_gpu
def test_lean_recompute_changes_no_gradient_on_cuda(tmp_path, monkeypatch):
    """lora.kernel=fused_triton in bf16 with dropout and groups, reentrant checkpointing: each layer's down_proj
    skipping its output in the recompute (filled with NaN here, so a reader would show) leaves the loss and every LoRA gradient
    bit-identical (sdpa's math backend: its flash/efficient backward is not deterministic)."""
    from test_fused_lora import _peft_4bit
    from test_lean_recompute import poison_skipped
    from train import lora
    from train.kernels import lean_recompute

    compiled_triton()
    skipped = poison_skipped(monkeypatch)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3)).cuda()
    results, models = {}, {}
    for lean in (False, True):
        models[lean], cfg = _peft_4bit(tmp_path / str(lean), "bfloat16", 0.3, kernel="fused_triton", r=16, alpha=32)
        lora.match_training_dtypes(models[lean], cfg.quant)
        models[lean].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        models[lean].enable_input_require_grads()
    _copy_lora(models[False], models[True])
    layers = models[True].config.num_hidden_layers
    assert lean_recompute.install(models[True]) == layers
    for lean, net in models.items():
        torch.manual_seed(5)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            loss = net.train()(input_ids=ids, labels=ids).loss
            loss.backward()
        results[lean] = loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    assert skipped == [1] * layers
    (loss_l, grads_l), (loss_f, grads_f) = results[True], results[False]
    assert torch.equal(loss_l, loss_f) and loss_f.isfinite()
    assert grads_f.keys() == grads_l.keys() and len(grads_f) == 2 * 7 * layers
    for name in grads_f:
        assert torch.equal(grads_l[name], grads_f[name]), name

# ---------------------------------------------------------------- (d) varlen attention vs padded sdpa

def _varlen_spy(monkeypatch) -> list:
    """Re-register the sdpa_varlen attention around a counting varlen_attn; the model looks the attention
    function up on every forward, so this catches the calls of an already loaded model."""
    import torch.nn.attention.varlen as varlen

    from train.kernels import attention

    calls = []
    real = varlen.varlen_attn

    @functools.wraps(real)
    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counting)
    attention.register()
    return calls


def check_varlen(net, calls, device="cuda", expect_varlen: bool = True) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from test_packing import ROWS, per_row_losses

    lengths = list(map(len, ROWS))
    lora = [p for n, p in net.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)

    def losses_and_grads(forward):
        net.zero_grad(set_to_none=True)
        losses = forward()
        sum(losses).backward()
        return torch.stack(losses).detach(), [p.grad.clone() for p in lora]

    def padded():  # right-padded rows with an attention mask: sdpa, as packing=none trains
        width = max(lengths)
        ids = torch.zeros(len(ROWS), width, dtype=torch.long)
        mask = torch.zeros(len(ROWS), width, dtype=torch.long)
        for i, row in enumerate(ROWS):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = net(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return [row_loss(logits[i], ids[i].to(device), 0, n) for i, n in enumerate(lengths)]

    def packed(cu=None):  # TRL's padding-free batch, as the Trainer passes it
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
            [{"input_ids": r, "labels": r} for r in ROWS])
        batch.pop("labels")
        if cu is not None:
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = int(cu[-1])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = net(**batch).logits[0]
        starts = [0] + torch.tensor(lengths).cumsum(0).tolist()[:-1]
        return [row_loss(logits, batch["input_ids"][0], s, n) for s, n in zip(starts, lengths)]

    def row_loss(logits, ids, start, n):
        return torch.nn.functional.cross_entropy(logits[start: start + n - 1].float(), ids[start + 1: start + n])

    def alone():  # each row by itself (test_packing's reference): no padding, no packing
        out = []
        with torch.no_grad():
            for row in ROWS:
                logits = net(input_ids=torch.tensor([row], device=device)).logits[0]
                out += per_row_losses(logits, torch.tensor(row, device=device), [len(row)])
        return out

    def rel(got, want):  # normwise relative difference over all LoRA gradients
        return (sum((g.double() - w.double()).norm() ** 2 for g, w in zip(got, want)) ** 0.5
                / sum(w.double().norm() ** 2 for w in want) ** 0.5).item()

    calls.clear()
    want, want_grads = losses_and_grads(padded)
    assert not calls  # padded batches take sdpa
    got, got_grads = losses_and_grads(packed)
    if expect_varlen:
        assert len(calls) == net.config.num_hidden_layers, "the packed batch must run the varlen kernel in every layer"
        assert calls[0][0] == sum(lengths)  # one flat sequence of all rows' tokens
    # bf16 compute, two attention kernels
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0, msg="per-row losses, packed vs padded")
    torch.testing.assert_close(got, torch.tensor(alone(), device=got.device), atol=2e-2, rtol=0,
                               msg="per-row losses, packed vs each row alone")
    # elementwise, a few of the 1024-element gradients differ by ~2e-3 on values of ~0.1 (an H200 run)
    error = rel(got_grads, want_grads)
    assert error < 5e-2, f"LoRA gradients, packed vs padded: {error:.3g} normwise"
    if expect_varlen:  # negative control: one sequence boundary for all rows lets later rows see earlier ones
        leaky, leaky_grads = losses_and_grads(lambda: packed(torch.tensor([0, sum(lengths)], dtype=torch.int32)))
        assert (leaky[1:] - want[1:]).abs().max() > 0.1
        assert rel(leaky_grads, want_grads) > 5 * error


@on_gpu
def test_varlen_attention_matches_padded_sdpa(tmp_path, monkeypatch):
    from conftest import adapted_nf4, small_config
    from train.kernels import attention

    cfg = small_config(tmp_path / "run")
    assert attention.resolve(cfg) == attention.NAME  # auto picks varlen for padding-free batches on a GPU
    net = adapted_nf4(cfg)  # non-zero B, so the adapter is in the computation
    assert net.get_base_model().config._attn_implementation == attention.NAME
    check_varlen(net.eval(), _varlen_spy(monkeypatch))
    monkeypatch.undo()
    attention.register()  # the real varlen_attn again for later tests


# ---------------------------------------------------------------- (c) tiny fit, interrupted and resumed

def cuda_config(run):
    """small_config on the default GPU fast path, plus the Triton dropout (rank 16) and paged AdamW."""
    from conftest import small_config

    return small_config(run, lora={"r": 16, "alpha": 32, "kernel": "fused_triton"},
                        train={"optimizer": "paged_adamw_32bit"})



@on_gpu
def test_sync_free_head_equals_trls_on_cuda_without_its_syncs(tmp_path, monkeypatch):
    """train/fused_head.py on the GPU fast path: a fit with TRAIN_SYNC_FREE_HEAD=1 takes it at every micro-batch; on one
    padding-free batch it gives TRL's fused head's loss, metrics and LoRA gradients bit for bit, with fewer device
    syncs (TRL's boolean-mask gather and scatter sync; index_select by the collator's index does not)."""
    import warnings

    from train import fused_head, late_log, patches
    from train import trainer as trainer_mod
    from train.fit import fit

    monkeypatch.setenv("TRAIN_SYNC_FREE_HEAD", "1")
    built, calls = [], []
    real_build, real_forward = trainer_mod.build_trainer, fused_head.forward
    monkeypatch.setattr(trainer_mod, "build_trainer", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    monkeypatch.setattr(fused_head, "forward", lambda *a: calls.append(1) or real_forward(*a))
    fit(_sync_free_config(tmp_path / "run"))
    assert len(calls) == 2  # 2 steps of one micro-batch each
    sft = built[0]
    sft.model.train()
    inputs = patches.prepare_inputs(sft, next(iter(sft.get_train_dataloader())))
    index = fused_head.pop(inputs)
    assert fused_head.usable(sft, sft.model, index) and "position_ids" in inputs  # padding-free, on the GPU
    got = {}
    for way, idx in (("ours", index), ("trl", None)):
        sft._metrics["train"].clear()
        sft._total_train_tokens = 0
        sft.model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                torch.manual_seed(9)
                loss = late_log.late_loss(sft, sft.model, dict(inputs), None, idx)
                loss.backward()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sft.late.settle(sft)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        grads = {n: p.grad.clone() for n, p in sft.model.named_parameters() if p.grad is not None}
        got[way] = loss.detach(), {k: list(v) for k, v in sft._metrics["train"].items()}, grads, syncs
    (loss_o, metrics_o, grads_o, syncs_o), (loss_t, metrics_t, grads_t, syncs_t) = got["ours"], got["trl"]
    assert torch.equal(loss_o, loss_t) and metrics_o == metrics_t
    assert grads_o.keys() == grads_t.keys() and all(torch.equal(grads_o[n], grads_t[n]) for n in grads_t)
    assert syncs_o <= syncs_t - 2, (syncs_o, syncs_t)


def _sync_free_config(run):
    """cuda_config for 2 steps with no dropout (the two heads' runs draw no masks: bit-comparable)."""
    from conftest import small_config

    return small_config(run, lora={"r": 16, "alpha": 32, "kernel": "fused_triton", "dropout": 0.0},
                        train={"max_steps": 2, "grad_accum": 1, "save_every": 100, "eval_every": None})

@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    """An uninterrupted 6-step CUDA run, and one stopped by SIGINT at step 3 and resumed to 6."""
    from test_pipeline import SignalAt
    from train.errors import Interrupted
    from train.fit import fit

    root = tmp_path_factory.mktemp("cuda-runs")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = K.lora_a_forward
        mp.setattr(K, "lora_a_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        whole = fit(cuda_config(root / "whole"))
        kernel_calls = len(calls)
        cut = cuda_config(root / "cut")
        with pytest.raises(Interrupted) as stopped:
            fit(cut, callbacks=[SignalAt(3)])
        resumed = fit(cut)
    return {"whole": whole, "resumed": resumed, "stopped": stopped.value, "kernel_calls": kernel_calls, "root": root}


@on_gpu
def test_cuda_fit_runs_the_gpu_fast_path(cuda_runs):
    import importlib.util

    from train import precision, sft_config
    from train.kernels import attention

    net = cuda_runs["whole"].model
    cfg = cuda_config(cuda_runs["root"] / "whole")
    assert precision.use_bf16(cfg) and precision.precision_context(cfg).fast_dtype == torch.bfloat16
    assert net.config._attn_implementation == attention.NAME
    assert next(p for n, p in net.named_parameters() if "lora_A" in n).is_cuda
    assert cuda_runs["kernel_calls"] > 0, "lora.kernel=fused_triton must run the Triton dropout"
    assert importlib.util.find_spec("liger_kernel"), "liger-kernel is a dependency on Linux (pyproject.toml)"
    assert sft_config.use_liger(cfg)
    liger = [m for m in net.modules()  # Liger binds its own forward to each RMSNorm instance
             if getattr(getattr(m.forward, "__func__", None), "__module__", "").startswith("liger_kernel")]
    assert len(liger) >= 2 * net.config.num_hidden_layers + 1, "Liger's RMSNorm must run in every norm"


@on_gpu
def test_cuda_resume_reproduces_the_uninterrupted_losses(cuda_runs):
    import json

    from safetensors.torch import load_file

    from test_pipeline import losses

    assert "checkpoint-3" in str(cuda_runs["stopped"])
    whole, resumed = losses(cuda_runs["whole"].run), losses(cuda_runs["resumed"].run)
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in whole:  # the same kernels, seeds and restored RNG states: the same losses (bitwise on an H200)
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step
    assert whole[6] < whole[1] - 0.5  # it trained
    a = load_file(cuda_runs["whole"].run / "adapter" / "adapter_model.safetensors")
    b = load_file(cuda_runs["resumed"].run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=1e-6, msg=key)
    rows = [json.loads(x) for x in (cuda_runs["whole"].run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("gpu_peak_gb", 0) for r in rows) > 0  # the metrics came from the GPU


# ---------------------------------------------------------------- (e) every model family: its own attention on the GPU

def packed_vs_padded_gap(net, device="cuda") -> float:
    """Largest per-row loss difference between test_packing's ROWS packed (padding-free) and padded."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from test_packing import ROWS, per_row_losses

    lengths, width = list(map(len, ROWS)), max(map(len, ROWS))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in ROWS], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS], device=device)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": r, "labels": r} for r in ROWS])
    batch.pop("labels")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        padded = net(input_ids=ids, attention_mask=mask).logits
        padded = [per_row_losses(padded[i], ids[i], [n])[0] for i, n in enumerate(lengths)]
        packed = per_row_losses(net(**batch).logits[0], batch["input_ids"][0], lengths)
    return max(abs(a - b) for a, b in zip(packed, padded))


@on_gpu
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"])
def test_each_family_runs_its_own_attention_packed_as_padded(tmp_path, monkeypatch, name):
    """Each family's tiny model (tests/families.py) on the GPU path (NF4, bf16, LoRA): `auto` picks the varlen
    kernel with each layer's window (Gemma 2: eager, its softcap has no kernel argument), and a packed batch gives
    each row the loss and LoRA gradients it gets padded and alone, rows longer than the window (16; Phi-3: 24)
    included (check_varlen). Negative control for the windowed families: the kernel told to ignore the window
    moves the rows past it."""
    from conftest import adapted_nf4
    from families import family_config
    from train.kernels import attention

    cfg = family_config(tmp_path / "run", name, quant={"compute_dtype": "bfloat16"})
    net = adapted_nf4(cfg).eval()  # non-zero B, so the adapter is in the computation
    base = net.get_base_model()
    varlen = name != "gemma2"
    assert base.config._attn_implementation == (attention.NAME if varlen else "eager")
    check_varlen(net, _varlen_spy(monkeypatch), expect_varlen=varlen)
    if varlen and any(layer.sliding_window for layer in attention.model_layers(base.config)):
        assert packed_vs_padded_gap(net) < 2e-2
        monkeypatch.setattr(attention, "kernel_args", lambda layer, window_param=True: {"window_size": (-1, 0)})
        assert packed_vs_padded_gap(net) > 2e-2, "without its window the kernel must compute another attention"
    monkeypatch.undo()
    attention.register()  # the real varlen_attn again for later tests


# ---------------------------------------------------------------- long rows (issue #21): offload and tiled MLP


def long_row_model(layers: int = 4, dropout: float = 0.0):
    """A bf16 Llama on CUDA, LoRA on all linear layers (nonzero B), reentrant checkpointing as our fit runs it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192)
    base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    net = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    for n, p in net.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return net.train()


def long_row_step(net, tokens: int = 4096):
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (1, tokens), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = net(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach().float(), {n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None}


@on_gpu
def test_one_step_adamw_matches_bitsandbytes_paged_adamw_on_cuda():
    """train/optim.py on the GPU: exactly paged_adamw_32bit's results (bitsandbytes' CUDA kernel, one tensor at a time),
    the same states paged (tensors of >= 1e5 elements) and the same device memory counted."""
    import bitsandbytes as bnb

    from train import optim

    shapes = [(16, 4096), (4096, 16), (16, 14336), (14336, 16), (16, 1024)] * 3

    def build(cls):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).cuda().bfloat16()) for s in shapes]
        return ps, cls(ps, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, optim_bits=32, is_paged=True)

    results = []
    for cls in (bnb.optim.AdamW, optim.flat_adamw_class()):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        ps, opt = build(cls)
        for k in range(6):
            g = torch.Generator().manual_seed(100 + k)
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=g) * 0.01).cuda().bfloat16()
            if k == 4:  # a tensor without a gradient: bitsandbytes' per-tensor path, on our paged views too
                ps[2].grad = None
            opt.step()
        for p in ps:
            p.grad = None
        torch.cuda.synchronize()
        paged = [getattr(opt.state[p]["state1"], "is_paged", False) or
                 getattr(opt.state[p]["state1"]._base, "is_paged", False) for p in ps]
        results.append((ps, opt, torch.cuda.memory_allocated() - before, paged))
    (ref_ps, ref, ref_mem, ref_paged), (ps, ours, mem, paged) = results
    assert ours.train_flat
    assert paged == ref_paged and any(paged) and not all(paged)
    assert abs(mem - ref_mem) < 2**20, (mem, ref_mem)
    for p, q in zip(ps, ref_ps):  # bitsandbytes' elementwise kernel on flat buffers: the same numbers exactly
        assert torch.equal(p, q)
        for key in ("state1", "state2"):
            assert torch.equal(ours.state[p][key].cpu(), ref.state[q][key].cpu()), key


@on_gpu
@pytest.mark.parametrize("reserve", [None, 8192])
def test_offloaded_checkpoints_train_exactly_as_resident_ones(reserve):
    """Side-stream copies out and one-layer-ahead prefetch back (the last layer's input kept, the one before it
    copied back as the forward ends): bit-identical loss and LoRA gradients, with slabs pinned as needed or reserved
    for a micro-batch of 8,192 tokens before the first copy (then a 2,048-token step and an 8,192-token one, which
    outgrows the slab pinned as needed for the first). A layer input of 2,048 tokens x 256 is offload.MIN_BYTES, the
    smallest offloaded: at 1,024 tokens (session 8's version of this test) the first step offloaded nothing."""
    from train.kernels import offload

    net = long_row_model()
    off = offload.install(net, "cuda", reserve_tokens=reserve)
    for tokens in (2048, 8192):
        # sdpa's math backend: its flash/efficient backward is not deterministic at 8,192 tokens (session 9 measured
        # 39-43 of 56 LoRA gradients differing between two resident runs), so only this one can be bit-compared
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            want = long_row_step(long_row_model(), tokens)
            for p in net.parameters():
                p.grad = None
            got = long_row_step(net, tokens)
        assert torch.equal(got[0], want[0])
        assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])
        if tokens == 2048:
            slabs = [id(s[0]) for s in off.slabs]
    assert (off.offloaded, off.prefetched) == (6, 6)  # 3 of 4 layer inputs a step, every one copied back ahead
    assert ([id(s[0]) for s in off.slabs] == slabs) == (reserve is not None)  # reserved: no slab pinned mid-run


@on_gpu
def test_tiled_mlp_matches_the_whole_mlp_in_bf16():
    from train.kernels import tiled_mlp

    want = long_row_step(long_row_model())
    net = long_row_model()
    assert tiled_mlp.install(net, True, tile=1024) == 4
    got = long_row_step(net)
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=5e-2, atol=5e-3, msg=n)


# ---------------------------------------------------------------- one long row through cuDNN (Hopper)

def _attention_of_one_row(monkeypatch, min_tokens: int, tokens: int = 16_384):
    """A Llama-3.1-8B-shaped attention (32 query heads, 8 k/v heads, head_dim 128, bf16) of one causal row of
    `tokens` through the registered sdpa_varlen function: output, q/k/v gradients and the cuDNN calls made."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from train.kernels import attention

    monkeypatch.setattr(attention, "CUDNN_MIN_TOKENS", min_tokens)
    calls, real = [], attention.cudnn_causal
    monkeypatch.setattr(attention, "cudnn_causal", lambda *a: calls.append(a[0].shape) or real(*a))
    attention.register()  # the function looks cudnn_causal and CUDNN_MIN_TOKENS up when called: the patches apply
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, tokens, 128, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (32, 8, 8))
    kw = {"cu_seq_lens_q": torch.tensor([0, tokens], device="cuda"), "max_length_q": tokens, "sliding_window": None}
    out, _ = ALL_ATTENTION_FUNCTIONS[attention.NAME](None, q, k, v, None, scaling=128 ** -0.5, **kw)
    out.float().square().sum().backward()
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)], calls


@on_gpu
def test_one_long_row_through_cudnn_equals_flashattention_varlen(monkeypatch):
    """On a Hopper GPU one 16K-token row goes to sdpa's cuDNN kernel (and only then), and its output and
    q/k/v gradients equal FlashAttention varlen's within bf16 rounding; a non-causal result would not."""
    from train.kernels import attention

    if torch.cuda.get_device_capability()[0] != attention.CUDNN_CAPABILITY_MAJOR:
        pytest.skip("cuDNN attention is routed on Hopper only")
    monkeypatch.setattr(attention, "_cudnn_refused", set())
    threshold = attention.CUDNN_MIN_TOKENS  # read before the first call patches it to 10**9
    want, calls = _attention_of_one_row(monkeypatch, min_tokens=10 ** 9)
    assert calls == []
    got, calls = _attention_of_one_row(monkeypatch, min_tokens=threshold)
    assert len(calls) == 1 and attention._cudnn_refused == set(), "the row must have run on cuDNN"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-2, name
    q = torch.randn(1, 32, 256, 128, device="cuda", dtype=torch.bfloat16)  # the control: causal mask matters
    kv = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
    causal, full = (torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=c, enable_gqa=True)
                    for c in (True, False))
    assert ((causal - full).float().norm() / full.float().norm()).item() > 1e-1
