"""`train eval`'s shared forward (train/eval/one_pass.py): one prompt + truth forward per batch gives the same
loss and the same greedy answers as the separate loss pass and generation it replaces, on the real 4-bit path,
for families with sliding windows shorter than the rows (the KV cache is cut back across the window)."""

import pytest

from conftest import adapted_nf4
from families import family_config, one_thread  # noqa: F401 (a fixture)
from train import data, model
from train.eval import evaluate, one_pass
from train.precision import precision_context


def _model_and_examples(cfg):
    path = model.resolve_model_path(cfg.model)
    tok = model.load_tokenizer(path, cfg.model)
    _, eval_split = data.load_splits(cfg, tok)
    peft_model = adapted_nf4(cfg, use_cache=True).eval()  # a trained-like adapter; generation keeps its cache
    examples = evaluate.eval_examples(eval_split, tok, cfg)
    return peft_model, tok, examples


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_one_forward_gives_the_two_passes_loss_and_answers(tmp_path, family, one_thread):
    cfg = family_config(tmp_path / "run", family, eval={"batch_size": 5, "max_new_tokens": 8})
    net, tok, examples = _model_and_examples(cfg)
    assert all(one_pass.shares_prompt(e) for e in examples) and len(examples) >= 10
    assert max(len(e["prompt_ids"]) for e in examples) > 16  # longer than the families' sliding window
    with precision_context(cfg):
        loss, answers = evaluate.loss_and_answers(net, tok, examples, cfg, answers=True)
        two_loss = evaluate.completion_loss(net, examples, tok.pad_token_id, cfg.eval.batch_size)
        two_answers = evaluate.generate(net, tok, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    assert loss["tokens"] == two_loss["tokens"]
    assert loss["loss"] == pytest.approx(two_loss["loss"], rel=1e-5)
    assert answers == two_answers
    assert len(set(answers)) > 1  # the rows get different answers: a cache mixed up across rows would show


def test_rows_whose_prompt_carries_loss_take_the_two_passes(tmp_path, one_thread):
    """A row whose labels start inside its prompt (a multi-turn chat's earlier answers) cannot share the
    prompt's forward: shares_prompt says so, and loss_and_answers computes such rows as before."""
    cfg = family_config(tmp_path / "run", "llama", eval={"batch_size": 4, "max_new_tokens": 4})
    net, tok, examples = _model_and_examples(cfg)
    e = dict(examples[0])
    enc = e["enc"]
    n = len(e["prompt_ids"])
    e["enc"] = type(enc)(input_ids=enc.input_ids, labels=enc.input_ids[:n] + enc.labels[n:],
                         prompt_ids=enc.prompt_ids)
    assert not one_pass.shares_prompt(e) and one_pass.shares_prompt(examples[0])
    rows = [e, *examples[1:6]]
    with precision_context(cfg):
        loss, answers = evaluate.loss_and_answers(net, tok, rows, cfg, answers=True)
        two_loss = evaluate.completion_loss(net, rows, tok.pad_token_id, cfg.eval.batch_size)
    assert loss == two_loss and loss["tokens"] > sum(len(r["enc"].input_ids) - len(r["prompt_ids"]) for r in rows[1:])
    assert len(answers) == len(rows)
