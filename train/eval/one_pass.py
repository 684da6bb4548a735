"""Owns eval's shared forward: one forward over each batch's prompt + truth gives the completion loss (loss.py's
token-weighted definition) and the prompts' KV cache, which greedy generation continues from. A separate loss
pass and generation each ran the prompt once: on the CPU demo that was half of `train eval`'s time."""

from __future__ import annotations

from typing import Any

import torch

from train.loss import IGNORE, token_nll


def shares_prompt(example: dict[str, Any]) -> bool:
    """The row's loss tokens start after the prompt it is generated from: its encoded ids begin with prompt_ids
    and nothing in the prompt carries a label (not so for multi-turn chats, whose earlier answers carry loss)."""
    enc, prompt = example["enc"], example["prompt_ids"]
    if not prompt or len(enc.input_ids) <= len(prompt):
        return False
    return enc.input_ids[: len(prompt)] == prompt and all(t == IGNORE for t in enc.labels[: len(prompt)])


def layout(batch: list[dict[str, Any]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Prompts left-padded to end at one column W (as generation wants), each row's truth after its prompt and
    right-padding after that. position_ids count real tokens only, as generation counts them."""
    width = max(len(e["prompt_ids"]) for e in batch)
    tail = max(len(e["enc"].input_ids) - len(e["prompt_ids"]) for e in batch)
    ids, att, labels = [], [], []
    for e in batch:
        enc, n = e["enc"], len(e["prompt_ids"])
        left, right = width - n, tail - (len(enc.input_ids) - n)
        ids.append([pad_id] * left + enc.input_ids + [pad_id] * right)
        att.append([0] * left + [1] * len(enc.input_ids) + [0] * right)
        labels.append([IGNORE] * left + enc.labels + [IGNORE] * right)
    att_t = torch.tensor(att, device=device)
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": att_t,
            "position_ids": (att_t.cumsum(-1) - 1).clamp(min=0), "labels": torch.tensor(labels, device=device),
            "width": width}


@torch.no_grad()
def loss_and_answers(model, batch: list[dict[str, Any]], pad_id: int, stops: list[int], max_new_tokens: int | None):
    """([rows, 2] summed NLL and label count per row, as loss.row_nll; the generated token ids, or None when
    max_new_tokens is None). Every row must share its prompt (shares_prompt)."""
    from transformers import DynamicCache

    b = layout(batch, pad_id, next(model.parameters()).device)
    width, targets = b["width"], b["labels"][:, 1:]
    keep = torch.arange(width - 1, targets.size(1), device=targets.device)  # every label lies after the prompt
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()  # sliding-window layers keep what crop() must roll back to
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                past_key_values=cache, use_cache=True, logits_to_keep=keep)
    picked = targets[:, keep]
    nll = token_nll(out.logits, picked)
    rows = torch.stack([nll.sum(-1), (picked != IGNORE).sum(-1).float()], dim=-1)
    if max_new_tokens is None:
        return rows, None
    # back to the prompts less their last token, which generation feeds to predict the first answer token
    cache.crop(-(b["input_ids"].size(1) - width + 1))
    prompt, prompt_att = b["input_ids"][:, :width], b["attention_mask"][:, :width]
    gen = model.generate(input_ids=prompt, attention_mask=prompt_att, past_key_values=cache,
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=stops)
    return rows, gen[:, width:]
