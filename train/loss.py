"""Owns the loss definition: next-token NLL over labelled tokens, computing logits only where a label follows
(the training loss on CPU)."""

from __future__ import annotations

from typing import Any

import torch


def labelled_positions_loss(model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens, computing logits only where a label follows: the
    backbone's hidden states at those positions (`logits_to_keep` with indices) -> LM head -> fp32 CE.
    Every row of the batch is scored at the union of the rows' labelled positions; the rest are masked."""
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)  # positions whose next token is labelled
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
    picked = targets[:, keep]
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), picked.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (picked != -100).sum()
    return nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
