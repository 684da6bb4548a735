"""`train merge`: fold the adapter into the weights it was trained on; measure it against `train eval`'s model.

The adapter learned to correct the 4-bit base, so by default it is folded into that base dequantized (`--base
dequantized`): the merged model computes what the NF4 + adapter model computed in training and in `train eval`.
`--base original` folds it into the base's own (unquantized) weights instead: sharper base weights, but a model
that was never trained or scored as such. Either way the merge W + BA runs in fp32, its arithmetic is checked on
a few prompts, the weights are rounded once to the base's own dtype, and the saved model is compared with the NF4 +
adapter model on the run's eval rows: the largest logit gap and how many greedy answers agree (merge_check.json).
Never merge into the 4-bit weights themselves: the merged weights would be re-quantized.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train import adapter as adapter_lib
from train import model as model_lib
from train.errors import UserError

log = logging.getLogger("train")

BASES = ("dequantized", "original")  # what the adapter is folded into; the first is the default (what was trained)
PROBES = ["Once upon a time", "How much does this cost to the nearest dollar?\n\nA steel tool box.\n\nPrice is $",
          "The capital of France is"]  # used for the arithmetic check, and as eval rows when a run has none
MAX_REL_DIFF = 1e-4  # fp32 merged vs fp32 unmerged logits, relative to the logit scale: the merge arithmetic
GAP_POSITIONS = 16  # logits compared per eval row: its last tokens (the answer), enough to see a gap, bounded memory
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # the file's names -> torch's
REPORT = "merge_check.json"  # also the manifest of what merge wrote: `--overwrite` removes only those files


def merge(target: str, out: str, overwrite: bool = False, base: str = "dequantized",
          limit: int | None = None, dtype: str = "auto") -> dict[str, Any]:
    out_dir = Path(out)
    check_out_dir(out_dir, overwrite)
    built = build(target, base, limit, dtype)
    save(built.model, built.tok, built.cfg, out_dir, built.report, overwrite)
    return built.report


@dataclass
class Built:
    """A merged model and what it was checked on: export.py compares its GGUF with the same rows and scores."""
    model: Any  # fp32 arithmetic, weights holding the values of the dtype it is saved in
    tok: Any
    cfg: Any
    report: dict[str, Any]
    rows: list[dict[str, Any]]  # the eval rows (prompt_ids, ids) both models were scored on
    logits: list[torch.Tensor]  # the merged model's, per row (score())
    answers: list[str]  # the merged model's greedy answers


def build(target: str, base: str = "dequantized", limit: int | None = None, dtype: str = "auto") -> Built:
    """Merge, check the arithmetic, round to the saved dtype (auto: the base's own), and score against the NF4 +
    adapter model."""
    if base not in BASES:
        raise UserError(f"--base {base}: choose one of {', '.join(BASES)}")
    adapter_dir, cfg, tok, rows, where = eval_rows(target, limit)
    trained, tok, path = adapter_lib.load(adapter_dir, cfg, tok)
    reference, answers = score(trained, tok, rows, cfg)
    dense = dequantized_state(trained.get_base_model(), cfg) if base == "dequantized" else None
    del trained
    gc.collect()
    unmerged = load_dense_with_adapter(path, adapter_dir, cfg, dense)
    before = probe_logits(unmerged, tok)
    merged = unmerged.merge_and_unload()
    arithmetic = compare(before, probe_logits(merged, tok))
    if arithmetic["max_rel_diff"] > MAX_REL_DIFF:
        raise RuntimeError(f"merged model disagrees with the unmerged one (merge arithmetic): {arithmetic}; not saving")
    dtype = saved_dtype(path) if dtype == "auto" else getattr(torch, dtype)
    round_to(merged, dtype)
    got, merged_answers = score(merged, tok, rows, cfg, quantized=False)
    gap = compare(reference, got)
    agree = sum(a == b for a, b in zip(answers, merged_answers))
    report = {"base": base, "dtype": str(dtype).removeprefix("torch."), "rows": len(rows), "rows_from": where,
              "gap": gap, "answers_agree": agree, "answers": len(rows),
              **arithmetic}  # top level: the merge arithmetic (merged vs unmerged, fp32), bounded by MAX_REL_DIFF
    log.info("merged (%s base, saved %s) vs the NF4 + adapter model `train eval` scores, %d rows (%s): max |logit "
             "gap| %.4g (%.2e of the logit scale); greedy answers agree on %d/%d", base, report["dtype"], len(rows),
             where, gap["max_abs_diff"], gap["max_rel_diff"], agree, len(rows))
    if agree < len(rows):
        log.warning("the merged model answers %d of %d eval rows differently from the model `train eval` scored",
                    len(rows) - agree, len(rows))
    return Built(merged, tok, cfg, report, rows, got, merged_answers)


def eval_rows(target: str, limit: int | None):
    """The run's eval rows (the sample `train eval` scores), or PROBES when the run has no eval data."""
    from train.eval import evaluate

    adapter_dir = adapter_lib.find_adapter(target)
    cfg = adapter_lib.load_config_of(adapter_dir)
    if cfg.data.eval is None and cfg.data.eval_fraction == 0:
        tok = model_lib.load_tokenizer(str(adapter_dir), cfg.model, padding_side="left")
        rows = [{"prompt_ids": tok(p).input_ids, "ids": tok(p).input_ids} for p in PROBES]
        return adapter_dir, cfg, tok, rows, "probe prompts: the run has no eval data"
    adapter_dir, cfg, tok, examples, _ = evaluate.prepare_eval(target, None, limit, [])
    rows = [{"prompt_ids": e["prompt_ids"] or e["enc"].input_ids[:1], "ids": e["enc"].input_ids} for e in examples]
    return adapter_dir, cfg, tok, rows, "the run's eval rows"


@torch.no_grad()
def score(model, tok, rows, cfg, quantized: bool = True) -> tuple[list[torch.Tensor], list[str]]:
    """Each row's last GAP_POSITIONS logits (fp32, CPU) and its greedy answer. The NF4 model runs under training's
    autocast, as `train eval` runs it; the merged model in plain fp32."""
    import contextlib

    from train.eval import evaluate
    from train.precision import precision_context

    with precision_context(cfg) if quantized else contextlib.nullcontext():
        logits = [x for start in range(0, len(rows), cfg.eval.batch_size)
                  for x in last_logits(model, rows[start:start + cfg.eval.batch_size], tok.pad_token_id)]
        answers = evaluate.generate(model, tok, rows, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    return logits, answers


def last_logits(model, rows, pad_id: int) -> list[torch.Tensor]:
    """One left-padded batch (a 4-bit layer dequantizes once per call, not once per row): each row's last
    GAP_POSITIONS logits, fp32 on the CPU."""
    device = next(model.parameters()).device
    width = max(len(r["ids"]) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r["ids"])) + r["ids"] for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in rows], device=device)
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=GAP_POSITIONS).logits.float().cpu()
    return [out[i, -min(GAP_POSITIONS, len(r["ids"])):] for i, r in enumerate(rows)]


def dequantized_state(base, cfg) -> dict[str, torch.Tensor]:
    """The base's weights as training computed with them: every 4-bit layer dequantized in fp32, the rest as
    loaded. Keys are the plain model's (no LoRA wrappers)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    if cfg.quant.mode not in ("nf4", "fp4", "none"):
        raise UserError(f"quant.mode {cfg.quant.mode}: merge --base dequantized reads 4-bit weights only; "
                        "pass --base original")
    state = {}
    for name, module in base.named_modules():
        if "lora_" in name:
            continue
        prefix = name.replace(".base_layer", "") + "." if name else ""
        for key, p in module.named_parameters(recurse=False):
            if isinstance(module, bnb.nn.Linear4bit) and key == "weight":
                qs = copy.copy(p.quant_state)
                qs.dtype = torch.float32  # dequantize to fp32, not to the compute dtype
                p = dequantize_4bit(p.data, qs)
            state[prefix + key] = p.detach().to(torch.float32, copy=True).cpu()
    return state


def load_dense_with_adapter(path: str, adapter_dir: Path, cfg, state: dict[str, torch.Tensor] | None):
    """fp32 base (its original weights, or `state` where given) + the adapter, fp32 arithmetic."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=model_lib.device_map(),
                                                trust_remote_code=cfg.model.trust_remote_code,
                                                revision=cfg.model.revision, use_kernels=cfg.model.hub_kernels)
    if state is not None:
        missing, unexpected = base.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _tied(base, k)]
        if missing or unexpected:
            raise RuntimeError(f"dequantized weights do not fit the base: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(torch.float32).eval()


def _tied(model, key: str) -> bool:
    head = model.get_output_embeddings()
    return head is not None and key.startswith("lm_head") and head.weight is model.get_input_embeddings().weight


def saved_dtype(path: str) -> torch.dtype:
    """The base's own dtype (its config.json's, else its first weight file's), so the merged model is as large as
    the base; bf16 when neither says."""
    config = Path(path) / "config.json"
    raw = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or stored_dtype(Path(path))), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def stored_dtype(folder: Path) -> str | None:
    """The dtype of the first tensor of the folder's first .safetensors file ("float32"), or None."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as f:
        key = next(iter(f.keys()), None)
        return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype()) if key else None

@torch.no_grad()
def round_to(model, dtype: torch.dtype) -> None:
    """Round the weights to `dtype` once (what is saved), keeping fp32 arithmetic for the comparison."""
    for p in model.parameters():
        p.data = p.data.to(dtype).to(torch.float32)


@torch.no_grad()
def probe_logits(model, tok) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(**tok(p, return_tensors="pt").to(device)).logits.float().cpu() for p in PROBES]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    diff = max((a - b).abs().max().item() for a, b in zip(ref, got))
    scale = max(a.abs().max().item() for a in ref)
    return {"max_abs_diff": diff, "logit_scale": scale, "max_rel_diff": diff / max(scale, 1e-6)}


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An empty or new --out, or with --overwrite one holding only a previous merge's files (its manifest)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; choose a directory path")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out_dir}: directory is not empty; choose a new directory or pass --overwrite "
                        "(replaces a previous merge's files only)")
    ours = set(written_by_merge(out_dir))
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if foreign:
        raise UserError(f"--out {out_dir}: holds files `train merge` did not write ({', '.join(foreign[:3])}); "
                        "--overwrite replaces only a previous merge's output: choose another directory")


def written_by_merge(out_dir: Path) -> list[str]:
    """The files a previous merge wrote into `out_dir` (its manifest), or [] when it holds no merge's output."""
    try:
        files = json.loads((out_dir / REPORT).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):  # no manifest, or not ours
        return []
    return [*files, REPORT] if isinstance(files, list) else []


def save(merged, tok, cfg, out_dir: Path, report: dict[str, Any], overwrite: bool = False) -> None:
    """Write to a temporary sibling, then rename: an interrupted merge never leaves half a model."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(getattr(torch, report["dtype"])).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(cfg, report), encoding="utf-8")
    report["files"] = sorted(p.name for p in tmp.iterdir())
    (tmp / REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
    check_out_dir(out_dir, overwrite)  # again: minutes have passed since the first check
    if out_dir.exists():
        shutil.rmtree(out_dir)  # empty, or only a previous merge's files (check_out_dir)
    os.replace(tmp, out_dir)
    log.info("merged model saved to %s", out_dir)


def model_card(cfg, r: dict[str, Any]) -> str:
    return (f"# {cfg.model.name_or_path} + LoRA (merged, {r['dtype']})\n\n"
            f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on {cfg.lora.target_modules}, trained with QLoRA "
            f"({cfg.quant.mode}) by `python -m train fit`, merged in fp32 into the {r['base']} base, saved in "
            f"{r['dtype']}.\n\nAgainst the {cfg.quant.mode} + adapter model `train eval` scores, on {r['rows']} rows "
            f"({r['rows_from']}): max |logit gap| {r['gap']['max_abs_diff']:.4g} ({r['gap']['max_rel_diff']:.2e} of the logit "
            f"scale); greedy answers agree on {r['answers_agree']}/{r['answers']}.\n")
