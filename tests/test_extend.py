"""Extending a finished run: `--set train.max_steps=N` (more steps) on a run that ended at its schedule's
last step trains the extra steps on a new schedule from train.lr, resumes exactly inside that extension,
and moves an eval report of the previous adapter aside. Real 4-bit fits of builtin:tiny-llama on CPU."""

import json
import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import small_config
from test_pipeline import SignalAt
from train.errors import Interrupted
from train.fit import fit

STEPS, MORE, NEW_LR = 4, 7, 1e-3
# Short fits: no eval split (no end-of-fit eval to wait for); warmup 0, so the new cosine schedule over the
# three extra steps is exactly NEW_LR * (1 + cos(pi * k / 3)) / 2 for k = 0, 1, 2: 1, 0.75, 0.25 x NEW_LR.
# The interrupted copy stops at step 5 and so resumes two steps before the end: the first step after a
# resume runs at the lr the optimizer state restores, the second at the rebuilt schedule's
QUICK = {"data": {"eval_fraction": 0.0, "max_rows": 32}, "eval": {"task": "none"}}


class Said(logging.Handler):
    """Our log lines, as the user reads them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def config(run, **train):
    return small_config(run, train={"max_steps": STEPS, "save_every": 2, **train}, **QUICK)


def rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 4-step run; copies of it extended to 6 steps at a new lr, once straight through and once
    interrupted at step 5 then resumed; and the straight one run again (nothing left to train)."""
    root = tmp_path_factory.mktemp("extend")
    fit(config(root / "base"))
    for name in ("whole", "cut"):
        shutil.copytree(root / "base", root / name)
        (root / name / "eval").mkdir()
        (root / name / "eval" / "report.json").write_text('{"adapter": {"loss": 1.0}}')  # as `train eval` leaves it
    said, ours = Said(), logging.getLogger("train")
    level, _ = ours.level, ours.addHandler(said)
    ours.setLevel(logging.INFO)
    try:
        whole = fit(config(root / "whole", max_steps=MORE, lr=NEW_LR))
    finally:
        ours.removeHandler(said)
        ours.setLevel(level)
    with pytest.raises(Interrupted):
        fit(config(root / "cut", max_steps=MORE, lr=NEW_LR), callbacks=[SignalAt(STEPS + 1)])
    cut = fit(config(root / "cut", max_steps=MORE, lr=NEW_LR))
    shutil.copytree(root / "whole", root / "again")
    (root / "again" / "eval").mkdir()
    (root / "again" / "eval" / "report.json").write_text('{"adapter": {"loss": 2.0}}')
    again = fit(config(root / "again", max_steps=MORE, lr=NEW_LR))
    return {"root": root, "whole": whole, "cut": cut, "again": again, "said": said.lines}


def test_extra_steps_run_on_a_new_schedule_from_the_new_lr(runs):
    base, whole = rows(runs["root"] / "base"), rows(runs["whole"].run)
    assert sorted(whole) == list(range(1, MORE + 1))
    for step in range(1, STEPS + 1):  # the finished part is kept as it was
        assert whole[step]["loss"] == base[step]["loss"]
    # resuming the old schedule as it was would have run them at its end: lr 0 and about 0 (cosine)
    assert [whole[s]["lr"] for s in range(STEPS + 1, MORE + 1)] == pytest.approx([NEW_LR, NEW_LR * 0.75, NEW_LR * 0.25])
    assert whole[MORE]["loss"] < whole[STEPS]["loss"]  # it keeps learning
    ckpt = runs["whole"].run / "checkpoints" / f"checkpoint-{MORE}"
    assert json.loads((ckpt / "schedule.json").read_text()) == {"start": STEPS}
    assert runs["whole"].metrics["global_step"] == MORE


def test_extension_says_so_in_one_line(runs):
    said = runs["said"]
    assert f"checkpoint-{STEPS} ended its run's lr schedule; steps {STEPS + 1}-{MORE} get a new cosine schedule " \
           "from train.lr=0.001 (0 warmup steps)" in said
    assert not [m for m in said if m.startswith("resuming with a config that differs")]  # the lr: named above
    assert [m for m in said if "eval.stale" in m] == [
        f"{runs['whole'].run / 'eval'} described the previous adapter: moved to {runs['whole'].run / 'eval.stale'}; "
        f"run `python -m train eval {runs['whole'].run}` for a new report"]


def test_resume_inside_the_extension_reproduces_it(runs):
    whole, cut = rows(runs["whole"].run), rows(runs["cut"].run)
    assert sorted(cut) == sorted(whole)
    for step in whole:
        assert cut[step]["lr"] == pytest.approx(whole[step]["lr"], rel=1e-9), step
        assert cut[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-6, abs=1e-7), step
    a = load_file(runs["whole"].run / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["cut"].run / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_new_adapter_moves_the_old_eval_report_aside(runs):
    for run in (runs["whole"].run, runs["cut"].run):
        assert not (run / "eval").exists()
        assert json.loads((run / "eval.stale" / "report.json").read_text()) == {"adapter": {"loss": 1.0}}


def test_rerun_of_a_finished_extension_trains_nothing_and_keeps_the_report(runs):
    again = runs["again"].run
    assert rows(again) == rows(runs["whole"].run)
    assert sorted(p.name for p in (again / "checkpoints").glob("checkpoint-*")) == \
        sorted(p.name for p in (runs["whole"].run / "checkpoints").glob("checkpoint-*"))
    assert json.loads((again / "eval" / "report.json").read_text()) == {"adapter": {"loss": 2.0}}  # same adapter


def fake_checkpoint(path, cfg, step, max_steps):
    """The files check_resume reads: the saved config and the Trainer's state."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    return path


def test_a_changed_lr_mid_schedule_is_said_not_to_apply(tmp_path, caplog):
    """The Trainer restores the schedule's base lr with its state: the warning must not suggest otherwise."""
    from train.checkpoints import check_resume

    old = config(tmp_path / "run")
    ckpt = fake_checkpoint(tmp_path / "checkpoint-2", old, 2, STEPS)
    with caplog.at_level(logging.WARNING, logger="train"):
        assert check_resume(ckpt, config(tmp_path / "run", lr=NEW_LR)) == ["train.lr"]
    assert [r.getMessage() for r in caplog.records] == [
        "resuming with a config that differs from checkpoint-2: train.lr: 0.003 -> 0.001 (not applied: the resumed "
        "schedule keeps its lr; a new train.lr applies to steps past its end)"]


def test_a_changed_lr_past_the_schedules_end_is_no_warning(tmp_path, caplog):
    """There it shapes the extension's new schedule, which its own line announces."""
    from train.checkpoints import check_resume

    ckpt = fake_checkpoint(tmp_path / f"checkpoint-{STEPS}", config(tmp_path / "run"), STEPS, STEPS)
    with caplog.at_level(logging.WARNING, logger="train"):
        check_resume(ckpt, config(tmp_path / "run", lr=NEW_LR, max_steps=MORE))
    assert not caplog.records
