"""`train merge`: fold the adapter into an unquantized copy of the base and prove the merge is faithful.

Never merge into 4-bit weights: the merged weights would be re-quantized, and that rounding loss
is unavoidable (peft/transformers maintainers say so). The base is loaded from its bf16 checkpoint,
the merge W + BA is done and verified in fp32 (a bf16-vs-bf16 comparison would mostly measure bf16
activation noise), and the result is rounded to bf16 once, when saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from train import adapter as adapter_lib
from train import model as model_lib
from train.errors import UserError

log = logging.getLogger("train")

PROBES = ["Once upon a time", "How much does this cost to the nearest dollar?\n\nA steel tool box.\n\nPrice is $",
          "The capital of France is"]
MAX_REL_DIFF = 1e-4  # fp32 merged vs fp32 base+adapter logits, relative to the logit scale


def merge(target: str, out: str, overwrite: bool = False) -> dict[str, Any]:
    adapter_dir = adapter_lib.find_adapter(target)
    cfg = adapter_lib.load_config_of(adapter_dir)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: directory is not empty; choose a new directory or pass --overwrite")
    path = model_lib.resolve_model_path(cfg.model)
    adapter_lib.check_same_base(adapter_dir, path)
    tok = model_lib.load_tokenizer(str(adapter_dir), cfg.model)

    unmerged = load_with_adapter(path, adapter_dir, cfg)
    reference = logits(unmerged, tok)
    merged = unmerged.merge_and_unload()
    check = compare(reference, logits(merged, tok))
    log.info("merge check on %d prompts: max |logit diff| %.4g (%.2e of the logit scale, bound %.0e)",
             len(PROBES), check["max_abs_diff"], check["max_rel_diff"], MAX_REL_DIFF)
    if check["max_rel_diff"] > MAX_REL_DIFF:
        raise RuntimeError(f"merged model disagrees with base+adapter: {check}; not saving")
    save(merged.to(torch.bfloat16), tok, cfg, out_dir, check)
    return check


def load_with_adapter(path: str, adapter_dir: Path, cfg):
    """Unquantized base (its bf16 weights, held in fp32) + the adapter, fp32 arithmetic."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=model_lib.device_map(),
                                                trust_remote_code=cfg.model.trust_remote_code,
                                                revision=cfg.model.revision, use_kernels=cfg.model.hub_kernels)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(torch.float32).eval()


@torch.no_grad()
def logits(model, tok) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(**tok(p, return_tensors="pt").to(device)).logits.float().cpu() for p in PROBES]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
    scale = max(a.abs().max().item() for a in ref)
    return {"max_abs_diff": diff, "logit_scale": scale, "max_rel_diff": diff / max(scale, 1e-6)}


def save(merged, tok, cfg, out_dir: Path, check: dict[str, float]) -> None:
    """Write to a temporary sibling, then rename: an interrupted merge never leaves half a model."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "merge_check.json").write_text(json.dumps(check, indent=1))
    (tmp / "README.md").write_text(
        f"# {cfg.model.name_or_path} + LoRA (merged, bf16)\n\n"
        f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {cfg.lora.target_modules}, trained with QLoRA "
        f"({cfg.quant.mode}) by `python -m train fit`, merged in fp32 and saved in bf16.\n\n"
        f"Merge check (fp32): max |logit difference| vs base+adapter {check['max_abs_diff']:.4g} "
        f"({check['max_rel_diff']:.2e} of the logit scale) on {len(PROBES)} prompts.\n"
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("merged model saved to %s", out_dir)
