"""One eval loss: the Trainer's (during and at the end of `fit`) and `train eval`'s are the same token-weighted
mean NLL (train/loss.py), so on the same weights and rows they agree to float rounding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import adapted_nf4, small_config
from train import data, model, trainer
from train.eval import evaluate
from train.fit import eval_dataset
from train.loss import row_nll
from train.precision import precision_context


def test_trainer_eval_loss_equals_train_eval_loss(tmp_path):
    # 12 rows in batches of 5, 5, 2 of unequal token counts: a mean of per-batch means differs from the
    # token-weighted mean (checked below), so only one definition shared by both can pass
    cfg = small_config(tmp_path / "run", eval={"batch_size": 5, "limit": 12})
    path = model.resolve_model_path(cfg.model)
    tok = model.load_tokenizer(path, cfg.model)
    train_split, eval_split = data.load_splits(cfg, tok)
    peft_model = adapted_nf4(cfg)  # a trained-like adapter
    sft = trainer.build_trainer(cfg, peft_model, tok, train_split.to_dataset(), eval_dataset(cfg, eval_split),
                                tmp_path / "run")
    trainer_loss = sft.evaluate()["eval_loss"]

    examples, _ = evaluate.sample_examples(evaluate.eval_examples(eval_split, tok, cfg), cfg.eval.limit,
                                           evaluate.sample_how(cfg), cfg.run.seed)
    assert [e["enc"].input_ids for e in examples] == sft.eval_dataset["input_ids"]  # the same rows, same order
    with precision_context(cfg):  # what `train eval` reports (evaluate_run), and its padded-batch fallback
        ours = evaluate.loss_and_answers(sft.model, tok, examples, cfg, answers=False)[0]
        padded = evaluate.completion_loss(sft.model, examples, tok.pad_token_id, cfg.eval.batch_size)
        batches = [evaluate.completion_loss(sft.model, examples[i:i + 5], tok.pad_token_id, 5)
                   for i in range(0, 12, 5)]
    assert trainer_loss == pytest.approx(ours["loss"], rel=1e-5)
    assert trainer_loss == pytest.approx(padded["loss"], rel=1e-5)
    per_batch_means = sum(len(examples[i:i + 5]) * b["loss"] for i, b in zip(range(0, 12, 5), batches)) / 12
    # the mean of per-batch means (transformers' eval loss) misses by 10x the tolerance: the check can fail
    assert per_batch_means != pytest.approx(ours["loss"], rel=1e-4), "these rows cannot tell the definitions apart"


def test_padding_free_batch_is_split_back_into_its_rows():
    """A padding-free batch (rows flattened into one, positions restarting per row, the label at each row's
    start masked as TRL does) gives each row the NLL sum and token count it gets in a padded batch."""
    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=50)).eval()
    rows = [torch.randint(1, 50, (n,)) for n in (7, 12, 4)]
    labels = [torch.where(torch.arange(len(r)) >= len(r) // 2, r, -100) for r in rows]  # the second half
    width = max(len(r) for r in rows)
    padded = {"input_ids": torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]),
              "attention_mask": torch.stack([(torch.arange(width) < len(r)).long() for r in rows]),
              "labels": torch.stack([torch.nn.functional.pad(l, (0, width - len(l)), value=-100) for l in labels])}
    flat_labels = torch.cat(labels)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    flat_labels[positions == 0] = -100
    flat = {"input_ids": torch.cat(rows)[None], "position_ids": positions, "labels": flat_labels}
    with torch.no_grad():
        expected, got = row_nll(net, padded), row_nll(net, flat)
    assert expected.shape == got.shape == (3, 2)
    assert expected[:, 1].tolist() == [4.0, 6.0, 2.0]  # each row's labelled tokens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
