"""train/fused_head.py: the collator's label index picks exactly TRL's labelled positions, and the sync-free head gives
TRL's fused head's loss, metrics and LoRA gradients (its CPU fallback here); with the switch on, the batches carry the
index and training and eval run as before wherever the head does not apply (CPU)."""

import json

import pytest
import torch

from conftest import small_config
from train import fused_head, late_log, patches
from train import trainer as trainer_mod
from train.fit import fit


def test_label_index_is_trls_mask_as_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, -100, -100]])
    batch = fused_head.LabelIndex(lambda examples: {"labels": labels.clone(), "input_ids": labels.clamp(min=0)})([])
    mask = labels[:, 1:] != -100  # TRL: labels shifted, hidden_states[:, :-1][mask]
    assert batch[fused_head.KEY].tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist() == [1, 2, 4, 5]
    shifted = fused_head.LabelIndex(lambda examples: {"labels": labels, "shift_labels": labels})([])
    assert fused_head.KEY not in shifted  # pre-shifted labels (context/sequence parallel): TRL's own head
    inputs = dict(batch)
    assert torch.equal(fused_head.pop(inputs), batch[fused_head.KEY]) and fused_head.KEY not in inputs


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A 1-step fit's trainer, with the switch on (its collator adds the index), and one training batch."""
    monkeypatch.setenv("TRAIN_SYNC_FREE_HEAD", "1")
    built = []
    real = trainer_mod.build_trainer
    monkeypatch.setattr(trainer_mod, "build_trainer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    fit(small_config(tmp_path / "run", train={"max_steps": 1}, lora={"dropout": 0.0}))
    sft = built[0]
    assert isinstance(sft.data_collator, fused_head.LabelIndex)
    sft.model.train()
    return sft, patches.prepare_inputs(sft, next(iter(sft.get_train_dataloader())))


def test_sync_free_head_gives_trls_loss_metrics_and_gradients(trained):
    sft, inputs = trained
    index = fused_head.pop(inputs)
    assert index is not None and index.numel() == int((inputs["labels"][:, 1:] != -100).sum())
    assert not fused_head.usable(sft, sft.model, index)  # CPU: TRL's head, as before (the GPU test uses this one)
    got = {}
    for way, idx in (("ours", index), ("trl", None)):
        sft._metrics["train"].clear()
        sft._total_train_tokens = 0  # TRL's num_tokens metric is a running total
        sft.model.zero_grad(set_to_none=True)
        loss = late_log.late_loss(sft, sft.model, dict(inputs), None, idx)
        loss.backward()
        sft.late.settle(sft)
        grads = {n: p.grad.clone() for n, p in sft.model.named_parameters() if p.grad is not None}
        got[way] = loss.detach(), {k: list(v) for k, v in sft._metrics["train"].items()}, grads
    (loss_o, metrics_o, grads_o), (loss_t, metrics_t, grads_t) = got["ours"], got["trl"]
    # the same rows through the same kernel: bit for bit (TRL's CPU fallback scores every position, then masks)
    assert torch.equal(loss_o, loss_t)
    assert metrics_o == metrics_t and metrics_t.keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
    assert grads_o.keys() == grads_t.keys() and any("lora_A" in n for n in grads_t)
    assert all(torch.equal(grads_o[n], grads_t[n]) for n in grads_t)


def test_switch_on_trains_and_evaluates_as_before_on_cpu(tmp_path, monkeypatch):
    """The index rides in every batch and is popped before the model sees it, in training and in eval."""
    rows = {}
    for env in ("0", "1"):
        monkeypatch.setenv("TRAIN_SYNC_FREE_HEAD", env)
        fitted = fit(small_config(tmp_path / env, train={"max_steps": 3, "eval_every": 3},
                                  eval={"during_training_limit": 2}))
        rows[env] = [{k: v for k, v in json.loads(x).items() if k != "time_s" and not k.endswith(("_runtime", "_per_second"))}
                     for x in (fitted.run / "metrics.jsonl").read_text().splitlines()]
    assert rows["1"] == rows["0"] and any("eval_loss" in r for r in rows["1"])
