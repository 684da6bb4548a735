"""Owns what is installed on the model's checkpointed layers when training begins, after Liger has bound its MLP
forwards and the Trainer has turned checkpointing on: train.offload_checkpoints (kernels/offload.py), train.tile_mlp
(kernels/tiled_mlp.py) and the lean recompute (kernels/lean_recompute.py)."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from train.config import Config
from train.errors import UserError

log = logging.getLogger("train")


def offloads(cfg: Config) -> bool:
    """train.offload_checkpoints as run: true needs checkpointing; auto = a GPU, checkpointing on, each process
    holding the whole model (not FSDP/DeepSpeed)."""
    from train.model import sharded_launch

    setting = cfg.train.offload_checkpoints
    gc = cfg.train.gradient_checkpointing
    gc = torch.cuda.is_available() if gc is None else gc  # None = on a GPU (train/config.py)
    if setting is True and not gc:
        raise UserError("train.offload_checkpoints: true offloads checkpointed layer inputs, and "
                        "train.gradient_checkpointing is off; turn it on, or set offload_checkpoints: auto")
    if not torch.cuda.is_available() or sharded_launch() is not None:
        return False
    return wants_offload(setting, gc)


def wants_offload(setting, gc: bool) -> bool:
    """The rule on a GPU (train plan plans with it): true, or auto with checkpointing, at any row length. On the
    default 8B workload (16 rows of <= 2,048 tokens) offload took the peak from 10.33 to 8.14 GB for 1.9 % tok/s,
    averaged over four same-machine pairs (docs/benchmarks.md, session 9), under the 3 % a default may cost; long rows
    are where the saved inputs run out of memory."""
    return setting is True or (setting == "auto" and gc)


def install(cfg: Config, model) -> dict:
    """Both switches and the lean recompute on `model` (idempotent); what was installed, for the log line and tests."""
    from train.kernels import lean_recompute, offload, tiled_mlp

    done = {"offload": False, "tiled_mlps": tiled_mlp.install(model, cfg.train.tile_mlp),
            "lean_layers": lean_recompute.install(model)}
    if offloads(cfg) and getattr(model, "checkpoint_offload", None) is None:
        model.checkpoint_offload = offload.install(model, torch.device("cuda", torch.cuda.current_device()),
                                                   reserve_tokens=cfg.train.batch_size * cfg.data.max_length)
        done["offload"] = model.checkpoint_offload is not None
    if done["offload"] or tiled_mlp.tiles(cfg.train.tile_mlp, cfg.train.batch_size * cfg.data.max_length):
        where = "offloaded to pinned CPU RAM" if done["offload"] else "kept on the device"
        calls = f">= {tiled_mlp.AUTO_MIN_TOKENS:,}" if cfg.train.tile_mlp == "auto" else f"> {tiled_mlp.TILE_TOKENS:,}"
        log.info("long rows: checkpointed layer inputs %s; MLP in %s-token chunks for calls of %s tokens",
                 where, f"{tiled_mlp.TILE_TOKENS:,}", calls)
    return done


class LongRows(TrainerCallback):
    """Installs them when training begins: the Trainer applies Liger and turns checkpointing on inside train()."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        install(self.cfg, model)
