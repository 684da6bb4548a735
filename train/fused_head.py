"""Owns the training loss head without device syncs: TRL's chunked LM head (trl.kernels.ChunkedLogProbFunction) over
the labelled positions, picked by an index the collator computes on the host.

Why: TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) picks the labelled positions with boolean masks,
`hidden_states[mask]` and `labels[mask]`, and scatters the results back with masked_scatter: two device syncs in the
forward and two in the backward, each waiting for the GPU to drain (docs/benchmarks.md, session 10: TRL's head was 18 %
of the forward's host samples, mostly that wait). The positions are known before the batch reaches the GPU. Here the
collator adds `label_index` (the flat positions whose next label is not -100), which travels to the device with the
batch; the head gathers those rows with index_select, whose length the host knows, runs the same
ChunkedLogProbFunction on them with TRL's arguments, and places the results where TRL's masked_scatter puts them (an
index_copy into zeros): the same rows in the same order, summed in the same order, so the same numbers.

Used where TRL's plain path would run on one GPU (late_log.plain_loss), for a model whose config has none of the logit
scalings TRL reads; anything else takes TRL's own head. TRAIN_SYNC_FREE_HEAD=1 turns it on (staged: on an H100 it made no
sync and matched TRL's head bit for bit, yet its steps ran 8 % slower in session 11's A/B, docs/benchmarks.md).
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
    """A collator that adds KEY to each batch of the collator it wraps: the flat positions b * T + t of the [B, T]
    batch whose next label labels[b, t + 1] is not -100, in row-major order (TRL's boolean mask, as indices, in the
    unshifted layout: the hidden states are then picked from a view). Batches without labels, or with pre-shifted
    `shift_labels`, are left alone."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # the wrapped collator's attributes (TRL's padding_free, pad_token_id, ...)
        if name.startswith("__") or "inner" not in self.__dict__:  # pickle and copy look before __init__ ran
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)

    def __call__(self, examples):
        batch = self.inner(examples)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if torch.is_tensor(labels) and labels.dim() == 2 and "shift_labels" not in batch:
            follows = torch.zeros_like(labels, dtype=torch.bool)
            follows[:, :-1] = labels[:, 1:] != -100
            batch[KEY] = follows.reshape(-1).nonzero().squeeze(1)
        return batch


def pop(inputs: dict):
    """The batch's label index, removed from it (None when the collator added none)."""
    return inputs.pop(KEY, None)


def causal_lm(model):
    """The causal LM inside a peft model (TRL patched its forward with the fused head), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def usable(trainer, model, index) -> bool:
    """This call can take the sync-free head: an index, one process, the model the trainer holds (no DDP wrapper to
    bypass), a GPU holding the LM head, plain LoRA (the head calls the backbone itself: peft's prompt learning and
    aLoRA act in its own forward, which that skips), and a causal LM whose logits TRL neither scales nor gathers."""
    if (index is None or not enabled() or not index.is_cuda or trainer.accelerator.num_processes != 1
            or model is not trainer.model):  # enabled() read at each step: the bench may alternate it
        return False
    peft = getattr(model, "active_peft_config", None)
    if peft is not None and (getattr(peft, "is_prompt_learning", False)
                             or getattr(peft, "alora_invocation_tokens", None) is not None):
        return False
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    text = lm.config.get_text_config()
    return (head is not None and head.weight.device == index.device
            and all(getattr(text, name, None) is None for name in SCALINGS)
            and not getattr(text, "output_router_logits", False))


def forward(trainer, model, inputs: dict, index: torch.Tensor) -> SimpleNamespace:
    """TRL's fused-head forward (its compact path) on the positions `index` picks, laid out as TRL returns them: per
    position of labels[:, 1:], log_probs, entropy and is_top1 (0 where unlabelled), and label_mask."""
    from trl.kernels import ChunkedLogProbFunction

    lm = causal_lm(model)
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    kwargs["use_cache"] = False
    with trainer.accelerator.autocast():  # what the prepared model's forward runs under
        hidden = lm.base_model(**kwargs).last_hidden_state
        head = lm.get_output_embeddings()
        rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, index)  # a view's rows: no copy of the rest
        targets = labels.reshape(-1).index_select(0, index + 1)  # the next position's label
        softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        per_token = ChunkedLogProbFunction.apply(rows, head.weight, head.bias, targets, 1.0, CHUNK, softcap, 1.0,
                                                 OUTPUTS)
    shape = (labels.size(0), labels.size(1) - 1)
    shifted = index - index // labels.size(1)  # b * T + t -> b * (T - 1) + t: the position in labels[:, 1:]
    log_probs, entropy, _, _, is_top1 = (
        None if x is None else x.new_zeros(shape).view(-1).index_copy(0, shifted, x).view(shape) for x in per_token)
    mask = torch.zeros(shape, dtype=torch.bool, device=index.device).view(-1).index_fill_(0, shifted, True).view(shape)
    return SimpleNamespace(log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)
