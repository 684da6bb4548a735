"""The one-kernel NF4 dequantization (train/kernels/nf4.py) against bitsandbytes' own, bit for bit, in Triton's CPU
interpreter in fp16 (the interpreter has no bf16; tests/test_gpu.py does the same on the GPU in bf16)."""

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from train.kernels import lora_kernels, nf4

pytest.importorskip("triton")


def _quantized(shape, nested, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, :64] *= 40  # one block far larger than the rest: the scales must differ per block
    return quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (64, 4096 + 192)])  # one partial program; several scale blocks of 256
def test_same_bits_as_bitsandbytes(nested, shape):
    assert lora_kernels.interpreting()
    packed, qs = _quantized(shape, nested)
    assert nf4.usable(packed, qs, torch.float16)
    got = nf4.dequantize(packed, qs, torch.float16)
    want = dequantize_4bit(packed, qs).half()  # fp32 products, one rounding to fp16: the kernel's arithmetic
    assert got.shape == want.shape == shape
    assert torch.equal(got, want)


def test_what_it_leaves_to_bitsandbytes():
    packed, qs = _quantized((64, 256), True)
    fp4, fp4_state = quantize_4bit(torch.randn(64, 256), blocksize=64, quant_type="fp4")
    assert not nf4.usable(fp4, fp4_state, torch.float16)  # FP4: another table, bitsandbytes' kernel
    wide, wide_state = quantize_4bit(torch.randn(64, 256), blocksize=128, quant_type="nf4")
    assert not nf4.usable(wide, wide_state, torch.float16)  # blocks of 128
    assert not nf4.usable(packed, qs, torch.float32)  # on CPU: bitsandbytes' own kernel, not the interpreter
    assert not nf4.usable(packed.view(1, -1), qs, torch.float16)  # bitsandbytes' old transposed packed layout
    assert nf4.dequantize(fp4, fp4_state, torch.float16) is None  # the caller then asks bitsandbytes


def test_launch_args_follow_a_moved_weight():
    """What a launch needs is kept on the quant_state per weight pointer: another weight under it is worked out anew."""
    packed, qs = _quantized((64, 256), True, seed=2)
    first = nf4.dequantize(packed, qs, torch.float16)
    assert torch.equal(first, dequantize_4bit(packed, qs).half())
    other = packed.clone()
    other[:8] = 0x77  # different codes under the same quant_state
    assert torch.equal(nf4.dequantize(other, qs, torch.float16), dequantize_4bit(other, qs).half())
    assert not torch.equal(nf4.dequantize(other, qs, torch.float16), first)
    qs.absmax = qs.absmax.clone()  # the same weight under moved scales (QuantState.to swaps its tensors in place)
    qs.absmax[:] = 0  # every nested scale now code2[0] * absmax2 + offset: a stale cache would not see it
    assert torch.equal(nf4.dequantize(other, qs, torch.float16), dequantize_4bit(other, qs).half())


def test_a_params4bit_weight_costs_one_python_dispatch(monkeypatch):
    """bitsandbytes' Params4bit sends every tensor attribute through a Python __torch_function__ (~1-5 us each on the
    GPU hosts): a dequantization reads it once (.data), then works on the plain tensor, with the same bits."""
    import bitsandbytes as bnb

    w = bnb.nn.Params4bit(torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 0.02, requires_grad=False,
                          quant_type="nf4", blocksize=64, compress_statistics=True).to("cpu")
    assert type(w) is bnb.nn.Params4bit and w.quant_state is not None
    want = dequantize_4bit(w.data, w.quant_state).half()
    calls = []
    real = bnb.nn.Params4bit.__torch_function__.__func__
    monkeypatch.setattr(bnb.nn.Params4bit, "__torch_function__",
                        classmethod(lambda cls, *a, **k: calls.append(a[0]) or real(cls, *a, **k)))
    for _ in range(2):  # the first call works out the launch, the second takes it from the cache
        calls.clear()
        assert torch.equal(nf4.dequantize(w, w.quant_state, torch.float16), want)
        assert len(calls) == 1, calls
