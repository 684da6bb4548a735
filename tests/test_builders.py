"""Pure builders and config loading: config -> BitsAndBytesConfig / LoraConfig / SFTConfig, YAML + --set.

No weights are loaded and nothing touches a GPU: every test here runs in well under a second
(after the one-time import of transformers/trl/peft).
"""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from conftest import REPO, small_config
from train.config import Config, LoraCfg, QuantCfg, dump_config, load_config
from train.errors import UserError
from train.lora import build_lora_config
from train.model import build_bnb_config
from train.sft_config import build_sft_config

DEMO = REPO / "configs" / "tiny.yaml"
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))  # top level only: configs/accelerate/ are accelerate's


# --------------------------------------------------------------------------------------------
# quant.* -> BitsAndBytesConfig


def test_bnb_defaults_are_qlora_nf4(monkeypatch):
    from train import precision

    monkeypatch.setattr(precision, "probe_cpu", lambda: precision.Probe(fp32_ms=1.0, bf16_ms=0.5))  # a bf16 CPU
    b = build_bnb_config(QuantCfg())
    assert b.load_in_4bit is True
    assert b.load_in_8bit is False
    assert b.bnb_4bit_quant_type == "nf4"
    assert b.bnb_4bit_use_double_quant is True
    assert b.bnb_4bit_compute_dtype == torch.bfloat16
    assert b.bnb_4bit_quant_storage == torch.uint8  # storage_dtype None means uint8
    assert b.llm_int8_skip_modules is None


def test_bnb_fp4_with_other_dtypes_and_no_double_quant():
    b = build_bnb_config(QuantCfg(mode="fp4", double_quant=False, compute_dtype="float16"))
    assert b.load_in_4bit is True
    assert b.bnb_4bit_quant_type == "fp4"
    assert b.bnb_4bit_use_double_quant is False
    assert b.bnb_4bit_compute_dtype == torch.float16


@pytest.mark.parametrize("storage, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("float32", torch.float32), ("uint8", torch.uint8)])
def test_bnb_storage_dtype_maps_to_torch_dtype(storage, dtype):
    assert build_bnb_config(QuantCfg(storage_dtype=storage)).bnb_4bit_quant_storage == dtype


def test_bnb_int8_loads_in_8bit():
    b = build_bnb_config(QuantCfg(mode="int8"))
    assert b.load_in_8bit is True
    assert b.load_in_4bit is False
    assert b.quantization_method() == "llm_int8"


def test_bnb_none_means_no_quantization():
    assert build_bnb_config(QuantCfg(mode="none")) is None
    assert build_bnb_config(QuantCfg(mode="none"), ["lm_head"]) is None


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_bnb_skip_modules_passed_through(mode):
    assert build_bnb_config(QuantCfg(mode=mode), ["o_proj", "lm_head"]).llm_int8_skip_modules == ["o_proj", "lm_head"]
    # an empty list is "no skip list", which lets transformers keep its own default (lm_head unquantized)
    assert build_bnb_config(QuantCfg(mode=mode), []).llm_int8_skip_modules is None


# --------------------------------------------------------------------------------------------
# lora.* -> peft.LoraConfig


def test_lora_defaults():
    c = build_lora_config(LoraCfg())
    assert c.r == 16
    assert c.lora_alpha == 32
    assert c.lora_dropout == pytest.approx(0.05)
    assert c.target_modules == "all-linear"
    assert c.use_rslora is False
    assert c.use_dora is False
    assert c.modules_to_save is None
    assert c.task_type == "CAUSAL_LM"
    assert c.bias == "none"


def test_lora_every_field_passed_through():
    c = build_lora_config(LoraCfg(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                  use_dora=True, modules_to_save=["lm_head"]))
    assert (c.r, c.lora_alpha, c.lora_dropout) == (4, 8, pytest.approx(0.1))
    assert set(c.target_modules) == {"q_proj", "v_proj"}  # peft stores a list as a set
    assert c.use_rslora is True
    assert c.use_dora is True
    assert list(c.modules_to_save) == ["lm_head"]
    assert c.task_type == "CAUSAL_LM"
    assert c.bias == "none"


# --------------------------------------------------------------------------------------------
# config -> trl.SFTConfig


def sft(tmp_path, has_eval=False, **sections):
    cfg = small_config(tmp_path / "run", **sections)
    return cfg, build_sft_config(cfg, tmp_path / "run", has_eval)


def test_sft_epochs_when_no_max_steps(tmp_path):
    _, a = sft(tmp_path, train={"max_steps": None, "epochs": 2.5})
    assert a.max_steps == -1  # -1: transformers trains for num_train_epochs
    assert a.num_train_epochs == 2.5


def test_sft_one_epoch_when_neither_is_set(tmp_path):
    _, a = sft(tmp_path, train={"max_steps": None})
    assert a.max_steps == -1
    assert a.num_train_epochs == 1.0


def test_sft_optimisation_fields(tmp_path):
    cfg, a = sft(tmp_path, train={"lr": 1e-4, "lr_scheduler": "linear", "batch_size": 3, "grad_accum": 5,
                                  "warmup_ratio": 0.03, "weight_decay": 0.01, "max_grad_norm": 0.5},
                 eval={"batch_size": 7}, run={"seed": 123})
    assert a.learning_rate == pytest.approx(1e-4)
    assert a.lr_scheduler_type == "linear"
    assert a.per_device_train_batch_size == 3
    assert a.per_device_eval_batch_size == 7
    assert a.gradient_accumulation_steps == 5
    assert a.weight_decay == pytest.approx(0.01)
    assert a.max_grad_norm == pytest.approx(0.5)
    assert a.seed == 123
    # warmup_ratio goes in as a fraction of the total steps: 3% of 100 steps is 3 warmup steps
    assert a.get_warmup_steps(100) == 3


@pytest.mark.parametrize("mode, packing, padding_free, max_length", [
    ("padding_free", False, True, None),  # the default: each micro-batch flattened, rows already cut by data.py
    ("bfd", True, True, 96),              # rows packed into data.max_length bins
    ("none", False, False, 96),           # padded to the longest row
])
def test_sft_packing_modes(tmp_path, mode, packing, padding_free, max_length):
    _, a = sft(tmp_path, train={"packing": mode}, model={"attn_implementation": "sdpa"})  # explicit: kept
    assert (a.packing, a.padding_free, a.max_length) == (packing, padding_free, max_length)
    assert a.include_num_input_tokens_seen == ("non_padding" if mode == "none" else "all")


def test_padding_free_default_falls_back_without_the_varlen_kernel(tmp_path, monkeypatch):
    from train.kernels import attention

    monkeypatch.setattr(attention, "available", lambda: False)  # CPU, or torch < 2.10
    _, a = sft(tmp_path)
    assert (a.padding_free, a.packing, a.max_length) == (False, False, 96)  # padded batches
    monkeypatch.setattr(attention, "available", lambda: True)  # a GPU with the kernel
    _, b = sft(tmp_path)
    assert (b.padding_free, b.packing, b.max_length) == (True, False, None)


def test_sft_gradient_checkpointing_is_reentrant(tmp_path):
    _, a = sft(tmp_path)
    assert a.gradient_checkpointing is torch.cuda.is_available()  # default: on a GPU, off on a CPU
    assert a.gradient_checkpointing_kwargs == {"use_reentrant": True}
    _, on = sft(tmp_path, train={"gradient_checkpointing": True})
    assert on.gradient_checkpointing is True
    _, off = sft(tmp_path, train={"gradient_checkpointing": False})
    assert off.gradient_checkpointing is False


def flow(args, max_steps: int) -> dict[str, list[int]]:
    """The steps at which transformers' own step-end rules (DefaultFlowCallback, as the Trainer runs it) evaluate
    and save a run built from `args`."""
    from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState

    state = TrainerState(max_steps=max_steps, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
                         save_steps=args.save_steps)
    out = {"eval": [], "save": []}
    for step in range(1, max_steps + 1):
        state.global_step = step
        control = DefaultFlowCallback().on_step_end(args, state, TrainerControl())
        out["eval"] += [step] * control.should_evaluate
        out["save"] += [step] * control.should_save
    return out


def test_sft_checkpoints_every_save_every_steps_and_at_the_end_under_run(tmp_path):
    _, a = sft(tmp_path, train={"save_every": 5})
    assert flow(a, 12)["save"] == [5, 10, 12]  # the last step too: checkpoints.finished relies on it
    assert Path(a.output_dir) == tmp_path / "run" / "checkpoints"


@pytest.mark.parametrize("has_eval, eval_every, steps", [
    (True, 5, [5, 10, 12]),  # every eval_every steps, and the last step (fit's closing table reuses it)
    (True, None, []),  # an eval split but no interval: no eval during training
    (False, 5, []),  # an interval but nothing to evaluate
    (False, None, []),
])
def test_sft_evaluates_every_eval_every_steps(tmp_path, has_eval, eval_every, steps):
    _, a = sft(tmp_path, has_eval, train={"eval_every": eval_every})
    assert flow(a, 12)["eval"] == steps


def test_sft_reports_nowhere_by_default(tmp_path):
    cfg, a = sft(tmp_path)
    assert cfg.log.report_to == []
    assert a.report_to in ([], ["none"], "none")  # "none": no integration is enabled


def test_sft_report_to_passed_through(tmp_path):
    _, a = sft(tmp_path, log={"report_to": ["tensorboard"], "run_name": "mine"})
    assert a.report_to == ["tensorboard"]
    assert a.run_name == "mine"
    _, b = sft(tmp_path)
    assert b.run_name == "run"  # default: the run directory's name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the paged -> adamw_torch fallback is CPU-only")
@pytest.mark.parametrize("optimizer, expected", [("paged_adamw_32bit", "adamw_torch"),
                                                 ("paged_adamw_8bit", "adamw_torch"),
                                                 ("adamw_torch", "adamw_torch"),
                                                 ("adamw_8bit", "adamw_8bit")])
def test_sft_paged_optimizer_falls_back_on_cpu(tmp_path, optimizer, expected):
    _, a = sft(tmp_path, train={"optimizer": optimizer})
    assert a.optim == expected
    assert a.use_cpu is True


# --------------------------------------------------------------------------------------------
# Config loading: YAML + --set


def write_yaml(path, text):
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """\
model:
  name_or_path: builtin:tiny-llama
data:
  train: data/demo/train.jsonl
"""


def test_set_overrides_are_typed():
    cfg = load_config(DEMO, ["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "train.eval_every=null",
                             "train.batch_size=2", "lora.use_rslora=true", "run.output_dir=runs/x"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.eval_every is None
    assert cfg.train.batch_size == 2 and isinstance(cfg.train.batch_size, int)
    assert cfg.lora.use_rslora is True
    assert cfg.run.output_dir == "runs/x"


def test_overrides_win_over_the_file_and_the_rest_of_the_file_stays():
    cfg = load_config(DEMO, ["lora.r=4"])
    assert cfg.lora.r == 4
    assert cfg.lora.alpha == 32  # from the file
    assert cfg.train.max_steps == 150


def test_yaml_numbers_are_typed(tmp_path):
    # YAML 1.1 reads 2e-4 (no dot) as a string, and 2 as an int: both must become floats
    path = write_yaml(tmp_path / "c.yaml", MINIMAL + "train:\n  lr: 2e-4\n  epochs: 2\n")
    cfg = load_config(path)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(2e-4)
    assert isinstance(cfg.train.epochs, float) and cfg.train.epochs == 2.0
    assert cfg.train.max_steps is None


def test_defaults_fill_everything_not_given(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", MINIMAL))
    assert cfg.lora == LoraCfg()
    assert cfg.quant == QuantCfg()
    assert cfg.model.name_or_path == "builtin:tiny-llama"


def test_set_without_a_file(tmp_path):
    cfg = load_config(None, ["model.name_or_path=builtin:tiny-llama", "data.train=data/demo/train.jsonl"])
    assert cfg.data.train == "data/demo/train.jsonl"


@pytest.mark.parametrize("override, hint", [
    ("train.learning_rate=1e-4", "did you mean train.lr?"),  # the transformers name
    ("train.lrr=1e-4", "did you mean train.lr?"),  # a typo
    ("lora.rank=8", "did you mean lora.r?"),
    ("data.max_len=64", "did you mean data.max_length?"),
    ("trian.lr=1e-4", "did you mean train?"),  # unknown section
])
def test_unknown_key_suggests_nearest(override, hint):
    with pytest.raises(UserError, match="unknown") as e:
        load_config(DEMO, [override])
    assert hint in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", MINIMAL + "train:\n  grad_acum: 2\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "did you mean train.grad_accum?" in str(e.value)


@pytest.mark.parametrize("override, match", [
    ("train.batch_size=two", "train.batch_size must be an integer"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("quant.mode=nf5", "quant.mode must be one of"),
    ("lora.use_dora=1", "lora.use_dora must be true or false"),
    ("train.eval_every=-1", r"train.eval_every must be >= 0 \(0: no eval during fit"),
    ("train.max_steps=0", "train.max_steps must be > 0"),
])
def test_bad_values_are_user_errors(override, match):
    with pytest.raises(UserError, match=match) as e:
        load_config(DEMO, [override])
    assert str(e.value).startswith(f"--set {override}: ")  # the --set item is named, not the file
    assert str(DEMO) not in str(e.value)


@pytest.mark.parametrize("override, dropped, notice", [
    ("train.epochs=2", "train.max_steps", "--set train.epochs=2 replaces train.max_steps: 150 from {DEMO}"),
    ("data.eval_fraction=0.1", "data.eval",
     "--set data.eval_fraction=0.1 replaces data.eval: data/demo/eval.jsonl from {DEMO}"),
])
def test_set_replaces_the_files_exclusive_partner(override, dropped, notice, caplog):
    """The command line wins over the file: its exclusive partner key is dropped, in one line."""
    with caplog.at_level(logging.INFO, logger="train"):
        cfg = load_config(DEMO, [override])
    section, name = dropped.split(".")
    assert getattr(getattr(cfg, section), name) is None
    assert [r.getMessage() for r in caplog.records] == [notice.format(DEMO=DEMO)]


def test_set_to_null_keeps_the_files_partner(caplog):
    with caplog.at_level(logging.INFO, logger="train"):
        cfg = load_config(DEMO, ["train.epochs=null"])
    assert cfg.train.max_steps == 150 and not caplog.records


def test_set_replaces_the_partner_the_other_way(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", MINIMAL + "train:\n  epochs: 2\n")
    cfg = load_config(path, ["train.max_steps=300"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (300, None)


def test_exclusive_keys_both_from_set_stay_an_error(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", MINIMAL)
    with pytest.raises(UserError) as e:
        load_config(path, ["train.max_steps=10", "train.epochs=2"])
    assert str(e.value) == ("--set train.max_steps=10 and --set train.epochs=2: train.max_steps and train.epochs "
                            "are exclusive; set only one")


def test_exclusive_keys_both_in_the_file_stay_an_error(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", MINIMAL + "train:\n  epochs: 2\n  max_steps: 5\n")
    with pytest.raises(UserError, match="train.max_steps and train.epochs are exclusive") as e:
        load_config(path, ["train.lr=1e-4"])
    assert str(e.value).startswith(str(path))


def test_sample_keys_default_to_random():
    cfg = load_config(DEMO)
    assert cfg.eval.sample == "random" and cfg.data.sample == "random"
    assert load_config(DEMO, ["data.sample=first", "eval.sample=first"]).data.sample == "first"
    with pytest.raises(UserError, match="data.sample must be one of random | first"):
        load_config(DEMO, ["data.sample=head"])


def roundtrip(cfg: Config, tmp_path) -> Config:
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    return load_config(path)


def test_dump_then_load_round_trips_demo(tmp_path):
    cfg = load_config(DEMO)
    assert roundtrip(cfg, tmp_path) == cfg


def test_dump_then_load_round_trips_non_defaults(tmp_path):
    cfg = small_config(
        tmp_path / "run",
        quant={"mode": "fp4", "double_quant": False, "compute_dtype": "float16", "storage_dtype": "bfloat16"},
        lora={"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "modules_to_save": ["lm_head"]},
        train={"max_steps": None, "epochs": 1.5, "lr": 1e-5, "eval_every": 10, "save_total_limit": None,
               "bf16": False, "resume": "never"},
        log={"report_to": ["tensorboard", "wandb"], "run_name": "r1"},
        eval={"task": "choice", "labels": ["yes", "no"], "limit": None},
        data={"prompt": "Q: {text}\n# not a comment: 'quoted' \"too\"\nA:", "completion": " {price:.2f}"},
        model={"revision": "main"},
    )
    back = roundtrip(cfg, tmp_path)
    assert back == cfg
    assert back.train.lr == 1e-5 and isinstance(back.train.lr, float)


def test_resolved_dump_holds_every_key(tmp_path):
    import yaml

    cfg = load_config(DEMO)
    dump_config(cfg, tmp_path / "r.yaml")
    raw = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert raw == cfg.to_dict()
    for section in dataclasses.fields(Config):  # every key of every section, whatever its value
        assert set(raw[section.name]) == {f.name for f in dataclasses.fields(getattr(cfg, section.name))}, section.name


def test_there_are_shipped_configs():
    assert DEMO in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # a shipped config that points at a local file must point at a file that ships too; the real-model
    # configs may point at the developers' copy of the pricer data in ../shared (checked where present)
    for spec in (cfg.data.train, cfg.data.eval):
        if spec and spec.endswith((".jsonl", ".json", ".csv", ".parquet")):
            if spec.startswith("../shared/"):
                if (REPO / "../shared").is_dir():
                    assert (REPO / spec).is_file(), f"{path.name}: {spec} is missing from ../shared"
                continue
            assert (REPO / spec).is_file(), f"{path.name}: {spec} is not in the repository"


@pytest.mark.parametrize("override, key, expected", [
    ("data.completion={price}", "completion", "{price}"),
    ("data.prompt=Question: {text}", "prompt", "Question: {text}"),
])
def test_set_template_stays_a_string(override, key, expected):
    cfg = load_config(DEMO, [override])
    assert getattr(cfg.data, key) == expected


def test_an_adapter_without_tensors_is_never_published(tmp_path):
    """FSDP/ZeRO-3 shards that were not gathered save as an empty adapter: refuse it, keep the old one."""
    import torch
    from safetensors.torch import save_file

    from train.adapter import check_saved

    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="without any LoRA tensors"):
        check_saved(tmp_path)
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    check_saved(tmp_path)


def test_gathered_adapter_is_written_as_peft_writes_it(tmp_path):
    """FSDP/ZeRO-3 adapters go through our writer (peft's save drops FSDP-prefixed names): same files,
    keys and tensors as peft's own save_pretrained, and peft loads it back."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.adapter import save_gathered

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=64))

    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    gathered = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    save_gathered(model, gathered, tmp_path / "ours")
    theirs, ours = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    reloaded = PeftModel.from_pretrained(tiny(), tmp_path / "ours")
    ids = torch.arange(10)[None]
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sft_step_waits_for_no_device_sync_it_can_avoid(tmp_path):
    """The Trainer's per-micro-step syncs that stall the host until the backward is done (the GPU then idles through
    the optimizer step's host work): the NaN filter is off, batches copy without waiting, tokens count on the host."""
    _, a = sft(tmp_path, train={"packing": "bfd"})  # (padding_free is padded on CPU: no varlen kernel)
    assert a.logging_nan_inf_filter is False
    assert a.accelerator_config.non_blocking is True
    assert a.dataloader_pin_memory is torch.cuda.is_available()  # pinned batches on a GPU (transformers: not on CPU)
    assert a.include_num_input_tokens_seen == "all"


def test_host_token_count_equals_the_trainers(tmp_path):
    from datasets import Dataset
    from transformers import Trainer

    from train import tiny
    from train.trainer import build_trainer

    cfg = small_config(tmp_path / "run", model={"name_or_path": "builtin:tiny-llama"})
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    tr = build_trainer(cfg, tiny.build_model(), tiny.build_tokenizer(), rows, None, tmp_path)
    inputs = {"input_ids": torch.ones(1, 37, dtype=torch.long), "position_ids": torch.arange(37)[None]}
    counts = []
    for track in (tr._track_num_input_tokens, lambda i: Trainer._track_num_input_tokens(tr, i)):
        tr.state.num_input_tokens_seen = 5
        track(inputs)
        counts.append(tr.state.num_input_tokens_seen)
    assert counts == [42, 42]


def test_flos_estimate_equals_the_trainers_and_counts_parameters_once(tmp_path, monkeypatch):
    """QLoRATrainer.floating_point_ops gives Trainer's 6 x tokens x non-embedding parameters, counting the parameters
    at its first call only (Trainer walks every parameter again each step)."""
    from datasets import Dataset
    from transformers import Trainer

    from train import tiny
    from train.trainer import build_trainer

    cfg = small_config(tmp_path / "run", model={"name_or_path": "builtin:tiny-llama"})
    tr = build_trainer(cfg, tiny.build_model(), tiny.build_tokenizer(), Dataset.from_dict({"input_ids": [[1, 2, 3]]}),
                       None, tmp_path)
    inputs = {"input_ids": torch.ones(1, 37, dtype=torch.long)}
    want = Trainer.floating_point_ops(tr, inputs)
    assert want > 0 and tr.floating_point_ops(inputs) == want
    monkeypatch.setattr(type(tr.model), "num_parameters", lambda *a, **k: pytest.fail("counted the parameters again"))
    assert tr.floating_point_ops({"input_ids": torch.ones(2, 37, dtype=torch.long)}) == 2 * want
    assert tr.floating_point_ops({"labels": torch.ones(1, 3)}) == 0  # no input ids: Trainer's 0
