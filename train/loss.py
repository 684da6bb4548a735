"""Owns the loss definition: next-token NLL over labelled tokens, computing logits only where a label follows. One
definition for the training loss on CPU, the Trainer's eval loss and `train eval`'s, both token-weighted."""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100  # the label of positions outside the loss (transformers' and data.py's convention)


def labelled_nll(model, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token NLL where a label follows, computing logits only there: the backbone's hidden states at those
    positions (`logits_to_keep` with indices) -> LM head -> fp32 CE. Every row of the batch is scored at the union
    of the rows' labelled positions. Returns (nll [rows, K], 0 where unlabelled; labelled mask [rows, K]; the K
    positions kept)."""
    targets = inputs["labels"][:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)  # positions whose next token is labelled
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
    picked = targets[:, keep]
    return token_nll(logits, picked), picked != IGNORE, keep


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target under its logits, in fp32; 0 where the target is IGNORE. [rows, K, V], [rows, K] -> [rows, K]."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="none").view_as(targets)


def labelled_positions_loss(model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token NLL over the batch's labelled tokens (or over `num_items_in_batch`, the Trainer's count
    across accumulation steps and ranks)."""
    nll, labelled, _ = labelled_nll(model, inputs)
    count = num_items_in_batch if num_items_in_batch is not None else labelled.sum()
    return nll.sum() / torch.as_tensor(count, device=nll.device).clamp(min=1)


def row_nll(model, inputs: dict[str, Any]) -> torch.Tensor:
    """[rows, 2] float32: each row's summed NLL over its labelled tokens, and their count. The eval losses are
    sum(NLL) / sum(count) over all rows. A padding-free batch (rows flattened into one, position_ids restarting
    at each row's start, where TRL masks the label) is split back into its rows."""
    nll, labelled, keep = labelled_nll(model, inputs)
    labels, positions = inputs["labels"], inputs.get("position_ids")
    if positions is not None and labels.size(0) == 1:
        starts = positions == 0
        owner, rows = starts.cumsum(-1) - 1, int(starts.sum())
    else:
        owner, rows = torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(labels), labels.size(0)
    owner = owner[:, 1:][:, keep].reshape(-1)  # a target belongs to the row of the token it predicts
    out = torch.zeros(2, rows, device=nll.device)
    out[0].index_add_(0, owner, nll.reshape(-1))
    out[1].index_add_(0, owner, labelled.reshape(-1).float())
    return out.T
