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
    # positions b * T + t whose next label is kept: rows 0 and 1 of a [2, 5] batch
    assert batch[fused_head.KEY].tolist() == [1, 2, 5, 6]
    mask = labels[:, 1:] != -100  # TRL: labels shifted, hidden_states[:, :-1][mask]
    index = batch[fused_head.KEY]
    assert (index - index // labels.size(1)).tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist() == [1, 2, 4, 5]
    shifted = fused_head.LabelIndex(lambda examples: {"labels": labels, "shift_labels": labels})([])
    assert fused_head.KEY not in shifted  # pre-shifted labels (context/sequence parallel): TRL's own head
    inputs = dict(batch)
    assert torch.equal(fused_head.pop(inputs), batch[fused_head.KEY]) and fused_head.KEY not in inputs


def test_label_index_collator_pickles_and_copies():
    """DataLoader workers under spawn/forkserver pickle the collator: the wrapper must survive it."""
    import copy
    import pickle

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    wrapped = fused_head.LabelIndex(DataCollatorForLanguageModeling(pad_token_id=0))
    for clone in (pickle.loads(pickle.dumps(wrapped)), copy.deepcopy(wrapped)):
        assert clone.pad_token_id == 0  # the wrapped collator's attributes, through the wrapper
        batch = clone([{"input_ids": [1, 2, 3]}])
        assert fused_head.KEY in batch


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


def test_long_padded_batch_bit_for_bit(trained):
    """Two padded rows of 600 tokens, about a third labelled: the sums over ~400 positions (loss, entropy, accuracy)
    come out as TRL's, because the results sit where TRL's masked_scatter puts them, zeros between."""
    sft, _ = trained
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 200, (2, 600), generator=g)
    labels = torch.where(torch.rand(2, 600, generator=g) < 0.35, ids, torch.full_like(ids, -100))
    labels[1, 500:] = -100  # the second row padded
    batch = {"input_ids": ids, "attention_mask": (torch.arange(600) < torch.tensor([[600], [500]])).long(),
             "labels": labels}
    index = fused_head.LabelIndex(lambda examples: dict(batch))([])[fused_head.KEY]
    got = {}
    for way, idx in (("ours", index), ("trl", None)):
        sft._metrics["train"].clear()
        sft._total_train_tokens = 0
        loss = late_log.late_loss(sft, sft.model, dict(batch), None, idx)
        sft.late.settle(sft)
        got[way] = loss.detach(), {k: list(v) for k, v in sft._metrics["train"].items()}
    assert index.numel() > 300
    assert torch.equal(got["ours"][0], got["trl"][0]) and got["ours"][1] == got["trl"][1]


def test_switch_on_trains_and_evaluates_as_before_on_cpu(tmp_path, monkeypatch):
    """The index rides in every batch and is popped before the model sees it, in training and in eval."""
    rows = {}
    for env in ("0", "1"):
        monkeypatch.setenv("TRAIN_SYNC_FREE_HEAD", env)
        fitted = fit(small_config(tmp_path / env, train={"max_steps": 3, "eval_every": 3},
                                  eval={"during_training_limit": 2}))
        rows[env] = [{k: v for k, v in json.loads(x).items()
                      if k != "time_s" and not k.endswith(("_runtime", "_per_second"))}
                     for x in (fitted.run / "metrics.jsonl").read_text().splitlines()]
    assert rows["1"] == rows["0"] and any("eval_loss" in r for r in rows["1"])


def test_usable_only_where_the_backbone_call_is_trls(trained, monkeypatch):
    """One process, the trainer's own model, the LM head beside the index, plain LoRA, no logit scaling."""
    import types

    sft, _ = trained
    on_gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"))  # an index as a GPU batch has it
    assert fused_head.usable(sft, sft.model, on_gpu)
    assert not fused_head.usable(sft, sft.model, None)
    assert not fused_head.usable(sft, object(), on_gpu)  # a wrapper (DDP) around the model: TRL's head
    assert not fused_head.usable(sft, sft.model, types.SimpleNamespace(is_cuda=True, device=torch.device("meta")))
    text = sft.model.get_base_model().config.get_text_config()
    monkeypatch.setattr(text, "logit_scale", 0.5, raising=False)
    assert not fused_head.usable(sft, sft.model, on_gpu)  # TRL scales these logits: its head
    monkeypatch.setattr(text, "logit_scale", None, raising=False)
    monkeypatch.setattr(sft.model.active_peft_config, "alora_invocation_tokens", [5], raising=False)
    assert not fused_head.usable(sft, sft.model, on_gpu)  # aLoRA acts in peft's forward, which the head skips
