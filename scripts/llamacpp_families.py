#!/usr/bin/env python3
"""Every family `train export` writes, run in llama.cpp itself (issue #23): a tiny random Llama, Qwen2, Qwen3 and
Gemma 3 (tests/families.py) is fine-tuned for a few steps, exported to f16 GGUF, and llama.cpp's logits and greedy
answers on the run's eval rows are compared with the merged model's in transformers (fp32), the same rows `train
export` checks in transformers' own GGUF loader.

    PYTHONPATH=/path/to/llama_cpp python scripts/llamacpp_families.py [--families llama,qwen2] [--out DIR]

llama-cpp-python is not a project dependency (scripts/llamacpp_check.py says how to install it). A logit gap is
max |llama.cpp - merged| over the last positions of each row, divided by the largest |logit| (merge.compare);
f16 weights bound it at BOUND. Writes DIR/llamacpp_families.json; exit 0 when every family is within the bound
with every greedy answer the same, 1 otherwise.

Gemma 3's sliding and global layers travel in the file (gemma3.attention.sliding_window_pattern): with the tiny
model's pattern swapped in the file (a control, 2026-12-07), llama.cpp's gap became 0.47 of the logit scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests", ROOT / "scripts"):  # the package, the tests' tiny families, llamacpp_check
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

BOUND = 5e-3  # export.BOUNDS["f16"]: f16 rounding of the weights, the same bound the transformers reload meets
FIT = dict(train={"max_steps": 3, "grad_accum": 1, "save_every": 3, "eval_every": None, "lr": 1e-2},
           data={"max_rows": 60}, eval={"task": "numeric", "limit": 12, "batch_size": 12, "max_new_tokens": 4})
# llama.cpp loads no byte-level BPE vocabulary without merges (the tiny tests' tokenizer has none, and gguf writes
# no empty array): a few merges of the demo's text, each a token of its own, within the tiny models' 320 rows
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("o", "n"), ("Ġ", "a"), ("r", "e"),
          ("a", "t"), ("e", "n"), ("Ġ", "s"), ("Ġ", "c"), ("o", "r"), ("Ċ", "Ċ"))


def tiny_base(name: str, root: Path) -> str:
    """The tiny model of family `name` in a folder, with MERGES in its vocabulary; Qwen2 without its sliding window
    (Qwen2.5's released models have none, and llama.cpp's qwen2 neither: export refuses one)."""
    from families import FAMILIES, build_model, build_tokenizer

    from train import tiny

    family = FAMILIES[name]
    if name == "qwen2":
        family = dataclasses.replace(family, config={})
    folder = root / f"tiny-{name}"
    folder.mkdir(parents=True)
    tok = build_tokenizer(family, merges=MERGES)
    tiny.save_weights(build_model(family, tok), folder)
    tok.save_pretrained(folder)
    return str(folder)


def llamacpp_scores(path: Path, built, threads: int) -> tuple[list, list[str]]:
    """llama.cpp's logits at the positions merge.score compares, and its greedy answers, on the built rows."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from llamacpp_check import greedy

    from train import merge as merge_lib
    from train.eval import evaluate

    rows, tok, cfg = built.rows, built.tok, built.cfg
    width = max(len(r["ids"]) for r in rows) + cfg.eval.max_new_tokens
    llm = Llama(model_path=str(path), n_ctx=width, n_threads=threads, n_batch=width, logits_all=True,
                verbose=False, seed=0)
    stops = set(evaluate.stop_ids(built.model, tok))
    logits, answers = [], []
    for r in rows:
        llm.reset()
        llm.eval(r["ids"])
        keep = min(merge_lib.GAP_POSITIONS, len(r["ids"]))
        logits.append(torch.from_numpy(np.array(llm.scores[len(r["ids"]) - keep:len(r["ids"])], dtype=np.float32)))
        answers.append(tok.decode(greedy(llm, r["prompt_ids"], stops, cfg.eval.max_new_tokens),
                                  skip_special_tokens=True))
    return logits, answers


def check_family(name: str, root: Path, threads: int) -> dict:
    from conftest import small_config

    from train import merge as merge_lib
    from train.export import export
    from train.fit import fit

    cfg = small_config(root / "run", model={"name_or_path": tiny_base(name, root)},
                       quant={"compute_dtype": "float32"}, **FIT)
    run = fit(cfg).run
    out = root / f"{name}.gguf"
    transformers_check = export(str(run), str(out))
    built = merge_lib.build(str(run), "dequantized", None, dtype="float32")
    start = time.perf_counter()
    logits, answers = llamacpp_scores(out, built, threads)
    gap = merge_lib.compare(built.logits, logits)
    agree = sum(a == b for a, b in zip(built.answers, answers))
    return {"family": name, "rows": len(answers), "answers_agree": agree, **gap,
            "within": gap["max_rel_diff"] < BOUND and agree == len(answers), "llamacpp_seconds":
            round(time.perf_counter() - start, 2), "transformers_reload": {k: transformers_check[k] for k in (
                "max_rel_diff", "answers_agree", "answers", "config_from")},
            "differ": [{"merged": a, "llama.cpp": b} for a, b in zip(built.answers, answers) if a != b]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="llama,qwen2,qwen3,gemma3")
    p.add_argument("--out", help="where the runs and the report go (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("error: llama-cpp-python is not installed (scripts/llamacpp_check.py says how)") from None
    import torch

    torch.set_num_threads(1)  # tiny ops: one thread is faster (tests/families.py one_thread)
    out = Path(args.out or tempfile.mkdtemp(prefix="llamacpp-families-"))
    if args.out and out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: --out {out} is not empty: name a new folder (its runs would be mixed with these)")
    results = []
    for name in args.families.split(","):
        res = check_family(name, out / name, args.threads)
        results.append(res)
        print(f"{name}: llama.cpp vs merged, {res['rows']} rows: max logit gap {res['max_rel_diff']:.2e} of the "
              f"logit scale (bound {BOUND:.0e}), greedy answers agree {res['answers_agree']}/{res['rows']} "
              f"[transformers' GGUF reload: {res['transformers_reload']['max_rel_diff']:.2e}, "
              f"{res['transformers_reload']['answers_agree']}/{res['transformers_reload']['answers']}]", flush=True)
    report = {"llama_cpp_python": llama_cpp.__version__, "families": results}
    (out / "llamacpp_families.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"report: {out / 'llamacpp_families.json'}")
    return 0 if all(r["within"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
