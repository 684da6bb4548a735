"""The saved adapter: write it atomically with tokenizer, config and model card; reload it onto the base."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from train import lora, model as model_lib
from train.eval import metrics as metrics_lib
from train.config import Config, dump_config, from_dict
from train.errors import UserError

log = logging.getLogger("train")

META = "training_meta.json"


def save(peft_model, tok, cfg: Config, run: Path, base_path: str, metrics: dict[str, Any], train_split, eval_split,
         state_dict: dict[str, Any] | None = None, fsdp: bool = False):
    """Write RUN/adapter/ via a temporary directory and a rename: a kill never leaves half an adapter.
    `state_dict`: full tensors gathered from ZeRO-3 or (`fsdp`) FSDP shards."""
    final, tmp = run / "adapter", run / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if fsdp:
        save_gathered(peft_model, state_dict, tmp)
    else:
        peft_model.save_pretrained(tmp, state_dict=state_dict)  # peft selects the adapter's keys itself
    check_saved(tmp)
    tok.save_pretrained(tmp)
    dump_config(cfg, tmp / "config.yaml")

    meta = {
        "base_model": cfg.model.name_or_path,
        "base_path": base_path,
        "base_fingerprint": model_lib.base_fingerprint(base_path),
        "metrics": metrics,
        "data": {"train": train_split.summary(), "eval": eval_split.summary() if eval_split else None},
        "train_answers": metrics_lib.train_answers(train_split.examples),  # the eval baselines, should data.train move
        "versions": versions(),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    (tmp / "README.md").write_text(model_card(cfg, meta), encoding="utf-8")
    old = run / ".adapter.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_gathered(peft_model, state_dict: dict[str, Any], path: Path) -> None:
    """Write LoRA A/B tensors gathered from FSDP shards in peft's adapter format (keys without the adapter
    name, adapter_config.json in inference mode). peft's own save_pretrained picks adapter tensors by the
    model's module names, which FSDP prefixes (patches.FSDP_WRAPPED), so it would keep none of them.
    Plain LoRA only: fit refuses DoRA and modules_to_save under FSDP."""
    import copy

    from safetensors.torch import save_file

    name = peft_model.active_adapter
    tensors = {k.replace(f".{name}.", "."): v.detach().cpu().contiguous()
               for k, v in state_dict.items() if "lora_" in k and f".{name}." in k}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(path))


def check_saved(path: Path) -> None:
    """An adapter file without tensors would load silently as the bare base model: refuse to publish it."""
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        if not any(True for _ in f.keys()):
            raise RuntimeError(f"{path}: the adapter was saved without any LoRA tensors (sharded weights not "
                               "gathered?); the previous adapter, if any, is left in place")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate", "datasets")
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def model_card(cfg: Config, meta: dict[str, Any]) -> str:
    q, l, d = cfg.quant, cfg.lora, cfg.data
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in meta["metrics"].items())
    return f"""---
base_model: {cfg.model.name_or_path}
library_name: peft
tags: [qlora, lora, sft]
---
# LoRA adapter for {cfg.model.name_or_path}

Trained with `python -m train fit` (QLoRA: 4-bit base, LoRA adapters).

## Base model and quantization
- base: `{cfg.model.name_or_path}`
- quantization: {q.mode}, double quant {q.double_quant}, compute {q.compute_dtype}

## LoRA
- r={l.r}, alpha={l.alpha}, dropout={l.dropout}, target modules: {l.target_modules}
- rsLoRA {l.use_rslora}, DoRA {l.use_dora}, modules_to_save {l.modules_to_save}

## Data
- format: {d.format}, max_length {d.max_length}, truncation {d.truncation}
- {meta['data']['train']}
- {meta['data']['eval']}

## Training
- steps/epochs: {cfg.train.max_steps or cfg.train.epochs or 1}, lr {cfg.train.lr} ({cfg.train.lr_scheduler}),
  batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum}, optimizer {cfg.train.optimizer}

## Final metrics
| metric | value |
| --- | --- |
{metrics}

## Use
```python
python -m train eval RUN_DIR          # loss/perplexity (and task metrics) base vs adapter
```
Versions: {json.dumps(meta['versions'])}
"""


def find_adapter(path: str | Path) -> Path:
    """RUN_DIR or ADAPTER_DIR -> the adapter directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such folder; pass the run directory `train fit` wrote (run.output_dir)")
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise UserError(f"{path}: no adapter found (no adapter_config.json here or in {p / 'adapter'}); "
                    "pass a run directory after `train fit` finished, or an adapter directory")


def load_config_of(adapter_dir: Path) -> Config:
    path = adapter_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no config.yaml beside the adapter; it was not saved by `train fit`")
    return from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def check_same_base(adapter_dir: Path, base_path: str) -> None:
    meta_path = adapter_dir / META
    if not meta_path.is_file():
        return
    trained = json.loads(meta_path.read_text()).get("base_fingerprint", {})
    now = model_lib.base_fingerprint(base_path)
    diff = {k: (trained.get(k), now.get(k)) for k in trained if trained.get(k) != now.get(k)}
    if diff:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise UserError(f"{adapter_dir}: adapter was trained on another base ({detail}); "
                        "set model.name_or_path to the base it was trained on")


def load(adapter_dir: Path, cfg: Config, tok=None):
    """Base quantized exactly as in training + the adapter, with training's dtypes. Returns (model, tok, path).
    `tok`: the adapter's tokenizer when the caller has already loaded it."""
    from peft import PeftModel

    path = model_lib.resolve_model_path(cfg.model)
    check_same_base(adapter_dir, path)
    if tok is None:
        tok = model_lib.load_tokenizer(str(adapter_dir), cfg.model, padding_side="left")
    base = model_lib.prepare_for_kbit(model_lib.load_base(cfg, path), cfg)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    lora.match_training_dtypes(peft_model, cfg.quant)
    peft_model.eval()
    return peft_model, tok, path


