"""train/late_log.py: a step's log read one step late writes what logging at once writes, and the loss and metrics
kept on the device are TRL's."""

import json
import types

import pytest
import torch
from transformers import TrainerCallback

from conftest import small_config
from train import late_log, patches
from train import trainer as trainer_mod
from train.fit import fit



def timeless(row: dict) -> dict:
    """A metrics.jsonl row without the wall-clock numbers, which differ between two runs."""
    return {k: v for k, v in row.items() if k != "time_s" and not k.endswith(("_runtime", "_per_second"))}


class Order(TrainerCallback):
    """The order of step ends and logs, as ('end', step) and ('log', step)."""

    def __init__(self):
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.events.append(("log", state.global_step))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same 6-step run (eval and a checkpoint at step 3) logged late and at once."""
    root, out = tmp_path_factory.mktemp("late"), {}
    mp = pytest.MonkeyPatch()
    try:
        for env in ("1", "0"):
            mp.setenv(late_log.ENV, env)
            order = Order()
            cfg = small_config(root / env, train={"eval_every": 3, "save_every": 3},
                               eval={"during_training_limit": 4})
            fitted = fit(cfg, callbacks=[order])
            rows = [json.loads(x) for x in (fitted.run / "metrics.jsonl").read_text().splitlines()]
            out[env] = ([timeless(r) for r in rows], order.events)
    finally:
        mp.undo()
    return out


def test_late_rows_equal_rows_logged_at_once(two_runs):
    (late, _), (at_once, _) = two_runs["1"], two_runs["0"]
    assert [r["step"] for r in late if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert late == at_once


def test_a_step_is_logged_after_the_next_one_ends_unless_it_saves(two_runs):
    late, at_once = two_runs["1"][1], two_runs["0"][1]
    assert at_once == [e for step in range(1, 7) for e in (("end", step), ("log", step))]
    # each step is logged when the next one has ended; step 3 (it saves and evaluates) and step 6 (the last) at once
    assert late == [("end", 1), ("end", 2), ("log", 1), ("end", 3), ("log", 2), ("log", 3), ("end", 4), ("end", 5),
                    ("log", 4), ("end", 6), ("log", 5), ("log", 6)]


def test_late_loss_equals_trl_compute_loss(tmp_path, monkeypatch):
    """On TRL's fused LM head (its CPU fallback here): the same loss, and after settling the same logged metrics."""
    from trl import SFTTrainer

    built = []
    real = trainer_mod.build_trainer
    monkeypatch.setattr(trainer_mod, "build_trainer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    fit(small_config(tmp_path / "run", train={"max_steps": 1}, lora={"dropout": 0.0}))
    sft = built[0]
    sft.model.train()
    inputs = patches.prepare_inputs(sft, next(iter(sft.get_train_dataloader())))
    got = {}
    for way in ("late", "trl"):
        sft._metrics["train"].clear()
        sft._total_train_tokens = 0
        if way == "late":
            loss = late_log.late_loss(sft, sft.model, dict(inputs))
            sft.late.settle(sft)
        else:
            loss = SFTTrainer.compute_loss(sft, sft.model, dict(inputs))
        got[way] = (loss.detach(), {k: list(v) for k, v in sft._metrics["train"].items()})
    patches.check_trainer_state(sft)  # what late_log reads is there (it raises PatchBroken when not: below)
    assert torch.equal(got["late"][0], got["trl"][0])
    assert got["late"][1] == got["trl"][1]
    assert set(got["trl"][1]) == {"entropy", "mean_token_accuracy", "num_tokens"} and got["trl"][1]["num_tokens"][0] > 0


def forced_loss(monkeypatch, way: str):
    """Trainers whose compute_loss is late_loss ("late", as on a GPU) or TRL's own ("trl"): on CPU QLoRATrainer takes
    neither (loss.labelled_positions_loss), so this is how the CPU sees the GPU's metric windows."""
    from trl import SFTTrainer

    real = trainer_mod.build_trainer

    def build(*args, **kwargs):
        tr = real(*args, **kwargs)
        if way == "late":
            tr.compute_loss = lambda model, inputs, return_outputs=False, num_items_in_batch=None: \
                late_log.late_loss(tr, model, inputs, num_items_in_batch)
        else:
            tr.compute_loss = types.MethodType(SFTTrainer.compute_loss, tr)
        return tr

    monkeypatch.setattr(trainer_mod, "build_trainer", build)


def rows_of(run) -> list[dict]:
    return [timeless(json.loads(x)) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("late_way", ["late", "trl"])
def test_metric_windows_equal_trl_logged_at_once(tmp_path, monkeypatch, late_way):
    """Two logging steps per log, two micro-batches per step, eval and a checkpoint at step 3, a last step that is not
    a logging step: late_loss logged late writes the rows (TRL's entropy, accuracy, token count included) and the
    train_loss that TRL's compute_loss logged at once writes. With TRL's own compute_loss (a non-plain loss: MoE aux
    loss, label smoothing, ...), which reads its metrics itself, each step logs at once and nothing is lost."""
    train = {"max_steps": 7, "logging_steps": 2, "grad_accum": 2, "eval_every": 3, "save_every": 3}
    got = {}
    for env, way in (("0", "trl"), ("1", late_way)):
        monkeypatch.setenv(late_log.ENV, env)
        forced_loss(monkeypatch, way)
        fitted = fit(small_config(tmp_path / env, train=train, eval={"during_training_limit": 2}))
        got[env] = (rows_of(fitted.run), fitted.metrics.get("train_loss"))
    assert got["1"] == got["0"]
    logged = [r for r in got["0"][0] if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6] and all("entropy" in r and "num_tokens" in r for r in logged)


class AskAt(TrainerCallback):
    """Sets control.<flag> in on_log of step `step`, as a user's callback may (early stopping on the loss)."""

    def __init__(self, flag: str, step: int = 2):
        self.flag, self.step = flag, step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step == self.step:
            setattr(control, self.flag, True)


@pytest.mark.parametrize("flag", ["should_training_stop", "should_save"])
def test_what_a_callback_asks_in_on_log_is_done_a_step_later(tmp_path, flag):
    """Step 2's row is written as step 3 ends: a stop or a checkpoint asked for then happens at step 3 (logging at once,
    at step 2). It is not lost."""
    fitted = fit(small_config(tmp_path / "run", train={"max_steps": 6, "save_every": 100}), callbacks=[AskAt(flag)])
    steps = [r["step"] for r in rows_of(fitted.run) if "loss" in r]
    checkpoints = sorted(p.name for p in (fitted.run / "checkpoints").iterdir())
    if flag == "should_training_stop":
        assert steps == [1, 2, 3]
    else:
        assert steps == [1, 2, 3, 4, 5, 6] and "checkpoint-3" in checkpoints


class FailAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == 5:
            raise RuntimeError("boom in step 5")


def test_the_waiting_row_is_written_when_training_raises(tmp_path):
    """Step 4's row waits for step 5's end; step 5 raises. The row is still written (QLoRATrainer.train's finally)."""
    cfg = small_config(tmp_path / "run", train={"max_steps": 6})
    with pytest.raises(RuntimeError, match="boom"):
        fit(cfg, callbacks=[FailAt()])
    assert [r["step"] for r in rows_of(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_a_trainer_without_the_state_late_log_reads_is_a_named_patch_break():
    import types as t

    trainer = t.SimpleNamespace(_globalstep_last_logged=0, _total_loss_scalar=0.0, _get_learning_rate=lambda: 0.0,
                                _metrics={}, _tp_size=1)
    with pytest.raises(patches.PatchBroken, match=r"trl .*_total_train_tokens.*TRAIN_LATE_LOG=0"):
        patches.check_trainer_state(trainer)
