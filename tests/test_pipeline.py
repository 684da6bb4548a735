"""End to end on CPU with real bitsandbytes 4-bit: fit -> interrupt -> resume -> adapter -> reload -> eval."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import small_config
from train import adapter
from train.eval import evaluate
from train.errors import Interrupted, UserError
from train.fit import fit
from train.precision import precision_context


class SignalAt(TrainerCallback):
    """Sends a real SIGINT to this process during a given step, like a user pressing Ctrl-C."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 6-step run, and one interrupted by SIGINT at step 3 then resumed to 6."""
    root = tmp_path_factory.mktemp("runs")
    during = {"train": {"eval_every": 3}, "eval": {"during_training_limit": 4}}
    whole = fit(small_config(root / "whole", **during))
    cut_cfg = small_config(root / "cut", **during)
    with pytest.raises(Interrupted) as stopped:
        fit(cut_cfg, callbacks=[SignalAt(3)])
    resumed = fit(cut_cfg)
    return {"whole": whole, "resumed": resumed, "stopped": stopped.value, "root": root}


def test_interrupt_saves_a_checkpoint_and_exits_nonzero(runs):
    ckpt = runs["root"] / "cut" / "checkpoints" / "checkpoint-3"
    assert "checkpoint-3" in str(runs["stopped"])
    assert runs["stopped"].exit_code == 130
    for name in ("COMPLETE", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (ckpt / name).is_file(), name


def test_resumed_run_logs_the_same_losses_as_uninterrupted(runs):
    whole, resumed = losses(runs["whole"].run), losses(runs["resumed"].run)
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step


def test_resumed_adapter_equals_uninterrupted_adapter(runs):
    a = load_file(runs["whole"].run / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["resumed"].run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_loss_falls(runs):
    steps = losses(runs["whole"].run)
    assert steps[6] < steps[1] - 0.5


def test_adapter_dir_is_complete(runs):
    out = runs["whole"].run / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                 "README.md", "training_meta.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "builtin:tiny-llama" in card and "nf4" in card and "r=8" in card and "eval_loss" in card


def test_reloaded_adapter_reproduces_trained_logits(runs):
    fitted = runs["whole"]
    cfg = adapter.load_config_of(fitted.run / "adapter")
    reloaded, tok, _ = adapter.load(fitted.run / "adapter", cfg)
    ids = tok(["How much does this cost?\n\nLarge steel drill.\n\nPrice is $", "Small plastic tent."],
              return_tensors="pt", padding=True)
    fitted.model.eval()
    with torch.no_grad(), precision_context(cfg):  # accelerate runs the trained model's forward in it
        trained = fitted.model(**ids).logits
        again = reloaded(**ids).logits
        with reloaded.disable_adapter():
            base = reloaded(**ids).logits
    torch.testing.assert_close(again.float(), trained.float(), rtol=0, atol=1e-5)
    assert (base.float() - trained.float()).abs().max() > 0.1  # the adapter really changes the output


def test_eval_report_base_vs_adapter(runs):
    run = runs["whole"].run
    report = evaluate.evaluate_run(str(run))
    saved = json.loads((run / "eval" / "report.json").read_text())
    assert saved["rows"] == 12 and saved["task"] == "numeric"
    assert saved["adapter"]["loss"] < saved["base"]["loss"] - 1.0
    assert saved["adapter"]["perplexity"] < saved["base"]["perplexity"]
    assert report["adapter"]["task"]["n"] == 12
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and {"id", "prompt", "truth", "base_output", "adapter_output"} <= set(preds[0])
    for chart in saved["charts"]:
        assert open(chart, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_task_metric_logged_during_training(runs):
    rows = [json.loads(x) for x in (runs["whole"].run / "metrics.jsonl").read_text().splitlines()]
    task_rows = [r for r in rows if "eval_mae" in r]
    assert sorted({r["step"] for r in task_rows}) == [3, 6]
    assert all("eval_hit_rate" in r and "eval_loss" in {k for x in rows if x["step"] == r["step"] for k in x}
               for r in task_rows)


def test_merge_round_trips(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.merge import MAX_REL_DIFF, merge

    out = tmp_path / "merged"
    check = merge(str(runs["whole"].run), str(out))
    assert check["max_rel_diff"] < MAX_REL_DIFF
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError):
        merge(str(runs["whole"].run), str(out))  # refuses to overwrite without --overwrite
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_generate_cli(runs, capsys):
    from train.cli import main

    prompt = "How much does this cost?\n\nLarge steel drill. Easy to clean.\n\nPrice is $"
    assert main(["generate", str(runs["whole"].run), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt) and len(out) > len(prompt)


def test_rerun_after_kill_between_last_checkpoint_and_adapter(runs, tmp_path):
    """Killed after the final checkpoint, before the adapter: the rerun trains no extra step."""
    import shutil

    from train.config import from_dict

    run = tmp_path / "whole"
    shutil.copytree(runs["whole"].run, run)
    shutil.rmtree(run / "adapter")
    raw = runs["whole"].run.joinpath("config.yaml").read_text()
    cfg = from_dict(__import__("yaml").safe_load(raw.replace(str(runs["whole"].run), str(run))))
    again = fit(cfg)
    assert losses(again.run) == losses(runs["whole"].run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == \
        sorted(p.name for p in (runs["whole"].run / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    a = load_file(runs["whole"].run / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
