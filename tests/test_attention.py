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
    import torch.nn.attention.varlen as varlen

    calls = []

    @functools.wraps(varlen.varlen_attn)  # register() reads the real signature (window_size, enable_gqa)
    def counting(*args, **kwargs):
        calls.append(kwargs.get("window_size"))
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counting)
    monkeypatch.setattr(attention, "KERNEL_DEVICES", ("cuda", "cpu"))
    attention.register()
    yield calls
    monkeypatch.undo()
    attention.register()  # the real varlen_attn again


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
