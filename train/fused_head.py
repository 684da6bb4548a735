"""Owns the training loss head without device syncs: TRL's chunked LM head (trl.kernels.ChunkedLogProbFunction) over
the labelled positions, picked by an index the collator computes on the host.

Why: TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) picks the labelled positions with boolean masks,
`hidden_states[mask]` and `labels[mask]`, and scatters the results back with masked_scatter: two device syncs in the
forward and two in the backward, each waiting for the GPU to drain (docs/benchmarks.md, session 10: TRL's head was 18 %
of the forward's host samples, mostly that wait). The positions are known before the batch reaches the GPU. Here the
collator adds `label_index` (flat positions of the shifted labels that are not -100), which travels to the device with
the batch; the head gathers those rows with index_select, whose length the host knows, and runs the same
ChunkedLogProbFunction on them with TRL's arguments: the same rows in the same order, so the same numbers.

Used where TRL's plain path would run on one GPU (late_log.plain_loss), for a model whose config has none of the logit
scalings TRL reads; anything else takes TRL's own head. TRAIN_SYNC_FREE_HEAD=1 turns it on (staged: off until it has
run on a GPU).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

KEY = "label_index"  # the batch key the collator adds; popped before the model sees the batch
CHUNK = 32768  # vocabulary columns per tile: TRL's own (trl.trainer.utils, _CHUNKED_LOGPROB_CHUNK_SIZE)
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks its head for (loss, entropy, token accuracy)
# config attributes by which TRL scales logits (add_fused_lm_head); a model with any of them set takes TRL's head
SCALINGS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def enabled() -> bool:
    return os.environ.get("TRAIN_SYNC_FREE_HEAD", "0") == "1"


class LabelIndex:
    """A collator that adds KEY to each batch of the collator it wraps: the flat positions of labels[..., 1:] that are
    not -100, in row-major order (TRL's boolean mask, as indices). Batches without labels, or with pre-shifted
    `shift_labels`, are left alone."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # the wrapped collator's attributes (TRL's padding_free, pad_token_id, ...)
        return getattr(self.inner, name)

    def __call__(self, examples):
        batch = self.inner(examples)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if torch.is_tensor(labels) and "shift_labels" not in batch:
            batch[KEY] = (labels[..., 1:].reshape(-1) != -100).nonzero().squeeze(1)
        return batch


def pop(inputs: dict):
    """The batch's label index, removed from it (None when the collator added none)."""
    return inputs.pop(KEY, None)


def usable(trainer, model, index) -> bool:
    """This call can take the sync-free head: an index, one process, the model the trainer holds (no DDP wrapper to
    bypass), a GPU, and a causal LM whose logits TRL neither scales nor gathers across ranks."""
    if index is None or not index.is_cuda or trainer.accelerator.num_processes != 1 or model is not trainer.model:
        return False
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = lm.config.get_text_config()
    return (all(getattr(text, name, None) is None for name in SCALINGS)
            and not getattr(text, "output_router_logits", False) and hasattr(lm, "get_output_embeddings"))


def forward(trainer, model, inputs: dict, index: torch.Tensor) -> SimpleNamespace:
    """TRL's fused-head forward (its compact path) on the positions `index` picks: log_probs, entropy and is_top1 of
    each labelled position, label_mask (its count, as a 0-d tensor: all late_log.record sums)."""
    from trl.kernels import ChunkedLogProbFunction

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    kwargs["use_cache"] = False
    with trainer.accelerator.autocast():  # what the prepared model's forward runs under
        hidden = lm.base_model(**kwargs).last_hidden_state[:, :-1]
        head = lm.get_output_embeddings()
        rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)
        targets = inputs["labels"][:, 1:].reshape(-1).index_select(0, index)
        softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
            rows, head.weight, head.bias, targets, 1.0, CHUNK, softcap, 1.0, OUTPUTS)
    count = torch.full((), index.numel(), device=index.device)
    return SimpleNamespace(log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=count)
