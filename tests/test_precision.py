"""quant.compute_dtype: auto picks what this machine computes fast (bf16 on GPU, on CPU only where bf16 is
native), says so in one line, records it in the run, and the model loads in it; hub kernels stay off."""

import logging
import math

import pytest
import torch
import yaml

from conftest import small_config
from train import precision
from train.config import QuantCfg

NATIVE = precision.Probe(fp32_ms=1.0, bf16_ms=0.6)  # AMX / AVX512-BF16: bf16 faster than fp32
EMULATED = precision.Probe(fp32_ms=0.05, bf16_ms=1.5)  # AVX2 only: measured 33x slower on such a CPU
AUTO = {"compute_dtype": "auto"}  # conftest.small_config pins float32; these tests are about auto


def test_auto_picks_bf16_only_where_it_is_native():
    assert precision.choose(on_gpu=True, probe=EMULATED)[0] == "bfloat16"  # GPUs keep bf16
    assert precision.choose(on_gpu=False, probe=NATIVE)[0] == "bfloat16"
    name, why = precision.choose(on_gpu=False, probe=EMULATED)
    assert name == "float32" and "no native bf16" in why and "30.0x" in why


def test_probe_measures_both_dtypes_on_this_cpu():
    p = precision.probe_cpu()
    assert p.fp32_ms > 0 and p.bf16_ms > 0
    assert precision.probe_cpu() is p  # measured once per process


@pytest.mark.parametrize("probe, want", [(NATIVE, torch.bfloat16), (EMULATED, torch.float32)])
def test_auto_reaches_the_quantization_config_and_autocast(monkeypatch, tmp_path, probe, want):
    from train.model import build_bnb_config

    monkeypatch.setattr(precision, "probe_cpu", lambda: probe)
    cfg = small_config(tmp_path, quant=AUTO)
    assert cfg.quant.compute_dtype == "auto"
    assert build_bnb_config(cfg.quant).bnb_4bit_compute_dtype == want
    assert precision.use_bf16(cfg) is (want == torch.bfloat16)
    with precision.precision_context(cfg):
        assert torch.is_autocast_enabled("cpu") is (want == torch.bfloat16)


def test_explicit_dtype_is_kept_without_probing(monkeypatch, tmp_path):
    def fail():
        raise AssertionError("an explicit compute_dtype must not probe")

    monkeypatch.setattr(precision, "probe_cpu", fail)
    cfg = small_config(tmp_path, quant={"compute_dtype": "bfloat16"})
    assert precision.resolved(cfg) is cfg
    assert precision.compute_dtype(QuantCfg(compute_dtype="float16")) == "float16"


def test_resolved_says_what_it_chose_in_one_line(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(precision, "probe_cpu", lambda: EMULATED)
    cfg = small_config(tmp_path, quant=AUTO)
    with caplog.at_level(logging.INFO, logger="train"):
        out = precision.resolved(cfg)
    assert out.quant.compute_dtype == "float32" and cfg.quant.compute_dtype == "auto"  # a copy, not mutated
    lines = [r.getMessage() for r in caplog.records if "compute_dtype" in r.getMessage()]
    assert len(lines) == 1 and "auto -> float32" in lines[0] and "no native bf16" in lines[0]


def test_fit_loads_records_and_runs_the_chosen_dtype(monkeypatch, tmp_path):
    """A whole fit with auto on a CPU without native bf16: the 4-bit layers compute in fp32, no autocast,
    hub kernels off in from_pretrained, and config.yaml records float32 for `train eval`."""
    import transformers

    from train.fit import fit

    monkeypatch.setattr(precision, "probe_cpu", lambda: EMULATED)
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    cfg = small_config(tmp_path / "run", quant=AUTO, train={"max_steps": 2, "save_every": 100}, eval={"task": "none"})
    fitted = fit(cfg)
    assert seen["use_kernels"] is False and seen["dtype"] == torch.float32
    q = [m for m in fitted.model.modules() if type(m).__name__ == "Linear4bit"]
    assert q and all(m.compute_dtype == torch.float32 for m in q)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["quant"]["compute_dtype"] == "float32"
    assert math.isfinite(fitted.metrics["train_loss"])


def test_hub_kernels_reach_from_pretrained_only_when_asked(monkeypatch, tmp_path):
    """model.hub_kernels: true is passed on as use_kernels=True (the default, False, is checked in the fit above)."""
    import transformers

    from train import model, tiny

    class Seen(Exception):
        pass

    def spy(cls, *args, **kwargs):
        raise Seen(kwargs["use_kernels"])

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    cfg = small_config(tmp_path, model={"name_or_path": "builtin:tiny-llama", "hub_kernels": True})
    with pytest.raises(Seen) as seen:
        model.load_base(cfg, str(tiny.materialize("builtin:tiny-llama")), quiet=True)
    assert seen.value.args == (True,)


def test_a_resumed_auto_run_keeps_the_precision_it_was_trained_in(monkeypatch, tmp_path):
    """The probe may decide otherwise in the resumed process (timing noise, another machine): the checkpoint's recorded
    compute dtype wins, so the resumed steps compute what the uninterrupted run computes; a fresh run still probes."""
    from train import checkpoints

    monkeypatch.setattr(precision, "probe_cpu", lambda: EMULATED)
    cfg = small_config(tmp_path / "run", quant=AUTO)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    for pattern in (checkpoints.MARKER, *checkpoints.NEEDED):  # a complete checkpoint: one file per pattern
        (ckpt / pattern.split("|")[0].replace("*", "")).write_text("x")
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"quant": {"compute_dtype": "bfloat16"}}))
    recorded = checkpoints.recorded_compute_dtype(cfg, tmp_path / "run")
    assert recorded == "bfloat16"
    assert precision.resolved(cfg, quiet=True, recorded=recorded).quant.compute_dtype == "bfloat16"
    assert checkpoints.recorded_compute_dtype(cfg, tmp_path / "run", overwrite=True) is None  # --overwrite: fresh
    assert checkpoints.recorded_compute_dtype(cfg, tmp_path / "elsewhere") is None
    assert precision.resolved(cfg, quiet=True, recorded=None).quant.compute_dtype == "float32"  # the probe decides


def test_native_and_emulated_bf16_are_told_apart_with_room_for_noise():
    """A native CPU measured 1.0x fp32's time and, in 1 of 3 runs, over 1.25x; emulation is 8-180x slower."""
    assert precision.Probe(fp32_ms=0.03, bf16_ms=0.06).native_bf16  # noise on a native CPU: still bf16
    assert not precision.Probe(fp32_ms=0.03, bf16_ms=0.24).native_bf16  # 8x: emulated
