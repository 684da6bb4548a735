"""The attention each model family gets (train/kernels/attention.py), on CPU: the per-layer decision (window and
softcap -> varlen kernel arguments, or the model's own attention), the window convention against transformers'
own sliding-window mask, and the padding-free path run end to end with a plain-torch kernel that follows
FlashAttention's documented window semantics. tests/test_gpu.py runs the same path on the real CUDA kernel.
"""

from __future__ import annotations

import functools

import pytest
import torch

from families import FAMILIES, WINDOW, model_config, one_thread  # noqa: F401  (fixture)
from train.errors import UserError
from train.kernels import attention
from train.kernels.attention import LayerAttention, kernel_args

pytestmark = pytest.mark.usefixtures("one_thread")


def family_config_object(name: str):
    return model_config(FAMILIES[name])


def flash_window_keeps(q: int, k: int, window_size: tuple[int, int]) -> bool:
    """FlashAttention's window_size (left, right) on index tensors q, k: key k is seen from query q iff
    q - left <= k <= q + right, both ends included; -1 is no limit on that side."""
    left, right = window_size
    return ((k >= q - left) if left >= 0 else k >= 0) & ((k <= q + right) if right >= 0 else k >= 0)


@pytest.mark.parametrize("window", [None, 1, 3, WINDOW, 2047])
def test_window_convention_is_transformers_own(window):
    """kernel_args' window_size keeps exactly the keys transformers' sliding-window causal mask keeps."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    keep = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    size = kernel_args(LayerAttention(sliding_window=window))["window_size"]
    n = 40
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    theirs = keep(torch.tensor(0), torch.tensor(0), q, k).expand(n, n)
    assert torch.equal(flash_window_keeps(q, k, size).expand(n, n), theirs), window
    if window is not None and window < n:  # off by one (left = W) would keep one key more per query
        assert not torch.equal(flash_window_keeps(q, k, (window, 0)), theirs)


def test_kernel_args_refuse_what_the_kernel_cannot_compute():
    assert kernel_args(LayerAttention()) == {"window_size": (-1, 0)}
    assert kernel_args(LayerAttention(sliding_window=16)) == {"window_size": (15, 0)}
    assert kernel_args(LayerAttention(), window_param=False) == {"is_causal": True}  # torch 2.10
    refused = {LayerAttention(softcap=50.0): "softcapping", LayerAttention(sinks=True): "sinks",
               LayerAttention(dropout=0.1): "dropout", LayerAttention(causal=False): "non-causal",
               LayerAttention(layer_type="chunked_attention"): "chunked_attention",
               LayerAttention(sliding_window=16, softcap=None): None}
    for layer, word in refused.items():
        got = kernel_args(layer, window_param=word is not None)
        assert isinstance(got, str) and (word or "sliding window") in got, (layer, got)


EXPECTED_WINDOWS = {"llama": [None, None], "qwen2": [None, WINDOW], "qwen3": [None, None],
                    "mistral": [WINDOW, WINDOW], "gemma2": [WINDOW, None], "gemma3": [WINDOW, None], "phi3": [24, 24]}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_layer_window_as_the_model_applies_it(name):
    """model_layers reads the windows the model's own attention modules apply (their sliding_window kwarg)."""
    from transformers import AutoModelForCausalLM

    config = family_config_object(name)
    layers = attention.model_layers(config)
    assert [l.sliding_window for l in layers] == EXPECTED_WINDOWS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for layer, module in zip(layers, (m for n, m in model.named_modules() if n.endswith("self_attn"))):
        own = getattr(module, "sliding_window", config.sliding_window if name in ("mistral", "phi3") else None)
        assert layer.sliding_window == own
    assert all((l.softcap is not None) == (name == "gemma2") for l in layers)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_choice_per_family(name, monkeypatch, tmp_path):
    """CPU: the model's own attention (Gemma 2: eager). A GPU with the kernel: varlen for every family whose
    layers it computes exactly, Gemma 2 keeps eager (one notice) and its padding-free batches are padded."""
    from conftest import small_config

    config = family_config_object(name)
    cfg = small_config(tmp_path, model={"name_or_path": f"family:{name}"})
    own = "eager" if name == "gemma2" else "sdpa"
    assert attention.choose(cfg, config)[0] == own
    monkeypatch.setattr(attention, "available", lambda: True)
    monkeypatch.setattr(attention, "_fell_back", set())
    impl, notice = attention.choose(cfg, config)
    assert impl == (own if name == "gemma2" else attention.NAME)
    assert (notice is not None) == (name == "gemma2") and (notice is None or "softcapping" in notice)
    if name == "gemma2":
        assert attention.resolve(cfg, config) == "eager" and attention.effective_packing(cfg) == "none"
    monkeypatch.setattr(attention, "kernel_has_window", lambda: False)  # torch 2.10: no window_size
    sliding = any(w is not None for w in EXPECTED_WINDOWS[name])
    assert attention.choose(cfg, config)[0] == (own if sliding or name == "gemma2" else attention.NAME)


def test_explicit_choices_the_model_cannot_run_are_refused(monkeypatch, tmp_path):
    from conftest import small_config

    gemma2 = family_config_object("gemma2")
    cfg = small_config(tmp_path, model={"attn_implementation": "sdpa"})
    with pytest.raises(UserError, match="model.attn_implementation: Gemma2ForCausalLM has no sdpa attention "
                                        r"\(attention logit softcapping \(50\)\); use auto \(picks eager\) or eager"):
        attention.choose(cfg, gemma2)
    monkeypatch.setattr(attention, "available", lambda: True)
    cfg = small_config(tmp_path, model={"attn_implementation": "sdpa_varlen"})
    with pytest.raises(UserError, match="sdpa_varlen cannot compute Gemma2ForCausalLM's attention exactly"):
        attention.choose(cfg, gemma2)
    assert attention.choose(cfg, family_config_object("mistral")) == (attention.NAME, None)
    eager = small_config(tmp_path, model={"attn_implementation": "eager"})
    assert attention.choose(eager, gemma2) == ("eager", None)


# ---------------------------------------------------------------- the padding-free path, CPU reference kernel

def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                     **_):
    """varlen_attn's documented semantics in plain torch: each sequence of the flat batch alone, keys kept by
    FlashAttention's window rule (flash_window_keeps)."""
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = end - start
        keep = flash_window_keeps(torch.arange(n)[:, None], torch.arange(n)[None, :], window_size)
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, scale=scale,
                                                             enable_gqa=enable_gqa)
        out[start:end] = o.transpose(0, 1)
    return out


@pytest.fixture
def cpu_varlen(monkeypatch):
    """sdpa_varlen registered around reference_varlen, run on CPU; counts the calls and their arguments."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("window_size"))
        return reference_varlen(*args, **kwargs)

    yield from _registered_around(monkeypatch, counting, calls)


def _registered_around(monkeypatch, kernel, value):
    """sdpa_varlen registered around `kernel` in place of varlen_attn, on CPU too; yields `value`, then the real
    kernel is registered again."""
    import torch.nn.attention.varlen as varlen

    # register() reads the real signature (window_size, enable_gqa)
    monkeypatch.setattr(varlen, "varlen_attn", functools.wraps(varlen.varlen_attn)(kernel))
    monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cuda", "cpu"))
    attention.register()
    yield value
    monkeypatch.undo()
    attention.register()


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "gemma2"])
def test_padding_free_varlen_equals_padded_and_alone_per_family(name, cpu_varlen, monkeypatch):
    """Packed rows through sdpa_varlen (reference kernel) give each row the loss it gets padded (sdpa) and alone,
    rows longer than the window included; with the window dropped, rows past it would differ."""
    from transformers import AutoModelForCausalLM

    from test_packing import ROWS, per_row_losses
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(family_config_object(name), attn_implementation=attention.NAME).eval()
    lengths = list(map(len, ROWS))
    width = max(lengths)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": r, "labels": r} for r in ROWS])
    batch.pop("labels")
    with torch.no_grad():
        alone = [per_row_losses(net(input_ids=torch.tensor([r])).logits[0], torch.tensor(r), [len(r)])[0]
                 for r in ROWS]
        padded = net(input_ids=ids, attention_mask=mask).logits
        padded = [per_row_losses(padded[i], ids[i], [n])[0] for i, n in enumerate(lengths)]
        assert not cpu_varlen
        packed = per_row_losses(net(**batch).logits[0], batch["input_ids"][0], lengths)
        windows = [w for w in EXPECTED_WINDOWS[name]]
        assert cpu_varlen == [(-1 if w is None else w - 1, 0) for w in windows]
        assert packed == pytest.approx(padded, abs=1e-4) and packed == pytest.approx(alone, abs=1e-4)
        if any(windows):  # negative controls: the window ignored, or one key too wide (left = W, not W - 1)
            for wrong in (lambda w: -1, lambda w: w):
                monkeypatch.setattr(attention, "kernel_args", lambda layer, window_param=True, wrong=wrong: {
                    "window_size": (-1 if layer.sliding_window is None else wrong(layer.sliding_window), 0)})
                off = per_row_losses(net(**batch).logits[0], batch["input_ids"][0], lengths)
                assert max(abs(a - b) for a, b in zip(off, padded)) > 1e-3


# ---------------------------------------------------------------- one long row: cuDNN on Hopper, else varlen

@pytest.mark.parametrize("cu, n, args, capability, device, refused, want", [
    ([0, 16384], 16384, {"window_size": (-1, 0)}, (9, 0), "cuda:0", set(), True),  # one long causal row, H100
    ([0, 16384], 16384, {"is_causal": True}, (9, 0), "cuda:0", set(), True),  # torch 2.10's causal argument
    ([0, 131072], 131072, {"window_size": (131071, 0)}, (9, 0), "cuda:0", set(), True),  # window covers the row
    ([0, 4095], 4095, {"window_size": (-1, 0)}, (9, 0), "cuda:0", set(), False),  # shorter than measured
    ([0, 9000, 16384], 9000, {"window_size": (-1, 0)}, (9, 0), "cuda:0", set(), False),  # packed: boundaries
    ([0, 16384], 16384, {"window_size": (4095, 0)}, (9, 0), "cuda:0", set(), False),  # Mistral's 4K window
    ([0, 16384], 16384, {"window_size": (-1, 0)}, (8, 0), "cuda:0", set(), False),  # A100: FlashAttention wins
    ([0, 16384], 16384, {"window_size": (-1, 0)}, (10, 0), "cuda:0", set(), False),  # B200: FlashAttention wins
    ([0, 16384], 16384, {"window_size": (-1, 0)}, (9, 0), "cuda:0", {"cuda:0"}, False),  # refused once before
    ([0, 16384], 16384, {"window_size": (-1, 0)}, (9, 0), "cpu", set(), False),
])
def test_one_long_row_goes_to_cudnn_only_where_it_is_faster_and_exact(cu, n, args, capability, device, refused,
                                                                      want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(attention, "_cudnn_refused", refused)
    assert attention.one_row_cudnn(torch.tensor(cu), n, args, torch.device(device)) is want


def _one_row(tokens: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, tokens, head_dim, generator=g) for h in (heads, kv_heads, kv_heads)]


def _registered():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[attention.NAME]


def test_cudnn_route_computes_the_varlen_kernels_attention(cpu_varlen, monkeypatch):
    """The one-row route's layout, GQA, scale and causal mask equal the varlen path's: sdpa's cuDNN backend
    stood in by sdpa's own (CPU) kernel, against the reference varlen kernel on the same row."""
    import torch.nn.attention as nn_attention

    q, k, v = _one_row(12)
    kw = {"cu_seq_lens_q": torch.tensor([0, 12]), "max_length_q": 12, "sliding_window": None}
    ref, _ = _registered()(None, q, k, v, None, scaling=0.3, **kw)
    assert len(cpu_varlen) == 1
    monkeypatch.setattr(attention, "one_row_cudnn", lambda *a: True)
    real = nn_attention.sdpa_kernel
    monkeypatch.setattr(nn_attention, "sdpa_kernel", lambda backends: real(
        [nn_attention.SDPBackend.MATH]))  # the CPU has no cuDNN: same call, the math kernel
    out, _ = _registered()(None, q, k, v, None, scaling=0.3, **kw)
    assert len(cpu_varlen) == 1, "the row must not have gone through varlen"
    assert out.shape == ref.shape == (1, 12, 4, 8)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_cudnn_refusal_falls_back_to_varlen_once_and_says_so(cpu_varlen, monkeypatch, caplog):
    """Where cuDNN has no kernel (here: a CPU tensor), the row goes through varlen, the device is remembered
    and one line says why; the result is the varlen kernel's."""
    q, k, v = _one_row(10)
    kw = {"cu_seq_lens_q": torch.tensor([0, 10]), "max_length_q": 10, "sliding_window": None}
    ref, _ = _registered()(None, q, k, v, None, **kw)
    monkeypatch.setattr(attention, "_cudnn_refused", set())
    monkeypatch.setattr(attention, "one_row_cudnn", lambda cu, n, args, device: str(device) not in
                        attention._cudnn_refused)
    with caplog.at_level("INFO", logger="train"):
        out, _ = _registered()(None, q, k, v, None, **kw)
        again, _ = _registered()(None, q, k, v, None, **kw)
    assert attention._cudnn_refused == {"cpu"}
    assert [r.getMessage() for r in caplog.records if "cuDNN refused" in r.getMessage()][0].startswith(
        "attention: cuDNN refused a 10-token row")
    assert len([r for r in caplog.records if "cuDNN refused" in r.getMessage()]) == 1
    assert len(cpu_varlen) == 3
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)


@pytest.fixture
def cheap_varlen(monkeypatch):
    """sdpa_varlen registered around a stand-in kernel whose backward is elementwise only (out = 2q + 3k + 5v, as
    many key/value heads as query heads): any zeroing or copy in the backward is the wrapper's."""
    def kernel(q, k, v, *args, **kwargs):
        return q * 2 + k * 3 + v * 5

    yield from _registered_around(monkeypatch, kernel, None)


def test_varlen_gradients_reach_q_k_v_tokens_major_without_copies(cheap_varlen):
    """q/k/v as transformers passes them after Liger's rope: (1, heads, tokens, head_dim) views of tokens-major
    storage. The kernel's gradients (tokens-major) must reach them as views of the same layout: no zeroed tensor,
    no copy in between, so Liger's rope backward (transpose(1, 2).contiguous()) copies nothing either. Indexing
    t[0] instead cost 9 copies and fills a layer on the 8B (docs/benchmarks.md, session 14)."""
    from conftest import aten_calls

    storage = [t.transpose(1, 2).contiguous().requires_grad_(True) for t in _one_row(12, kv_heads=4)]  # (1, T, H, d)
    q, k, v = (t.transpose(1, 2) for t in storage)
    layouts = []
    for t in (q, k, v):
        t.register_hook(lambda g: layouts.append(g.transpose(1, 2).is_contiguous()))
    kw = {"cu_seq_lens_q": torch.tensor([0, 5, 12]), "max_length_q": 7, "sliding_window": None}
    out, _ = _registered()(None, q, k, v, None, **kw)
    grad = torch.randn(out.shape)
    with aten_calls() as ops:
        out.backward(grad)
    assert layouts[-3:] == [True, True, True], "a gradient reached q/k/v heads-major: the rope backward copies it"
    wrappers = [n for n in ops.names if n in ("zeros", "zero_", "fill_", "select_backward", "clone", "contiguous")]
    assert not wrappers, wrappers
    for leaf, factor in zip(storage, (2, 3, 5)):
        torch.testing.assert_close(leaf.grad, factor * grad)  # (1, tokens, heads, d), as the kernel's output


def test_packed_batch_builds_no_dense_mask(cpu_varlen, monkeypatch):
    """transformers builds a [tokens, tokens] mask for every packed batch; the varlen path never reads it, so it is never
    built. A padded batch's layers fall back to sdpa, which reads it: built once per forward and mask type."""
    import transformers.masking_utils as mu
    from transformers import AutoModelForCausalLM

    from test_packing import ROWS
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    built = []
    real = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: built.append(k.get("q_length")) or real(*a, **k))
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(family_config_object("llama"), attn_implementation=attention.NAME).eval()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": r, "labels": r} for r in ROWS])
    batch.pop("labels")
    net(**batch)  # with grad, as in training
    assert cpu_varlen and built == []
    width = max(map(len, ROWS))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    net(input_ids=ids, attention_mask=mask)
    assert built == [width]
    with torch.no_grad():  # eval and generation: built at once (generation may pass it back as a tensor)
        mask = attention.lazy_sdpa_mask(batch_size=1, q_length=4, kv_length=4, allow_is_causal_skip=False)
    assert torch.is_tensor(mask)
