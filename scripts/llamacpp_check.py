#!/usr/bin/env python3
"""Runs a `train export` GGUF in llama.cpp itself (llama-cpp-python) on the run's eval rows and compares its greedy
answers with those `train eval` recorded for the NF4 + adapter model (RUN/eval/predictions.jsonl). `train export`
already checks the file in transformers' GGUF loader; this is the runtime users run it in (issue #23).

    python scripts/llamacpp_check.py RUN FILE.gguf [--limit N] [--threads N]

llama-cpp-python is not a project dependency: PyPI has it as a source distribution that compiles llama.cpp
(about 15 minutes on 2 cores): `pip install llama-cpp-python` in any environment that also has this project's.
Each row's prompt goes in as the token ids `train eval` used (from the tokenizer of the run, so the check is of the
model, not of two tokenizers); llama.cpp's own tokenization of the same text is compared apart. Generation is
greedy, `eval.max_new_tokens` long, and stops at the run's stop ids, as `train eval` does. Writes
FILE.gguf.llamacpp.json; exit 0 when every answer agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python scripts/llamacpp_check.py` from anywhere: the package is beside it
    sys.path.insert(0, str(ROOT))


def rows_of(run: str, limit: int | None):
    """The run's eval rows as `train eval` samples them, the run's stop ids, and its recorded adapter answers."""
    from train.eval import evaluate

    _, cfg, tok, examples, _ = evaluate.prepare_eval(run, None, limit, [])
    recorded = Path(run) / "eval" / "predictions.jsonl"
    if not recorded.is_file():
        raise SystemExit(f"error: {recorded} not found: run `python -m train eval {run}` first")
    answers = {r["id"]: r["adapter_output"] for r in map(json.loads, recorded.read_text().splitlines())}
    stops = set(evaluate.stop_ids(SimpleNamespace(generation_config=generation_config(cfg)), tok))
    return cfg, tok, [e for e in examples if e["id"] in answers], answers, stops


def generation_config(cfg):
    """The base's generation_config (its EOS ids are stop ids in `train eval`), or None where it has none."""
    from transformers import GenerationConfig

    from train.model import resolve_model_path

    try:
        return GenerationConfig.from_pretrained(resolve_model_path(cfg.model))
    except OSError:
        return None


def greedy(llm, prompt_ids: list[int], stops: set[int], max_new_tokens: int) -> list[int]:
    out = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stops or len(out) == max_new_tokens:
            break
        out.append(token)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run folder `train export` read (e.g. runs/demo)")
    p.add_argument("gguf", help="the exported .gguf file")
    p.add_argument("--limit", type=int, help="the first N of the run's eval rows (default: all that eval recorded)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2: the test machine's cores)")
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("error: llama-cpp-python is not installed: pip install llama-cpp-python (compiles "
                         "llama.cpp, ~15 min on 2 cores)") from None
    cfg, tok, examples, recorded, stops = rows_of(args.run, args.limit)
    width = max(len(e["prompt_ids"]) for e in examples) + cfg.eval.max_new_tokens
    llm = Llama(model_path=args.gguf, n_ctx=width, n_threads=args.threads, n_batch=width, verbose=False, seed=0)
    start = time.perf_counter()
    result = compare(llm, tok, examples, recorded, stops, cfg.eval.max_new_tokens)
    result.update(file=args.gguf, seconds=round(time.perf_counter() - start, 1))
    Path(f"{args.gguf}.llamacpp.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    own = result["own_tokenization"]
    print(f"llama.cpp on {args.gguf}: greedy answers agree with `train eval`'s on {result['answers_agree']}/"
          f"{result['rows']} rows (train eval's token ids in); llama.cpp's own tokenization of the prompt text gives "
          f"the same ids on {own['same_ids']}/{result['rows']}, and from its own ids where they differ the answer "
          f"still agrees on {own['answers_agree']}/{own['rows']}; {result['seconds']} s ({args.gguf}.llamacpp.json)")
    return 0 if result["answers_agree"] == result["rows"] else 1


def compare(llm, tok, examples, recorded, stops, max_new_tokens: int) -> dict:
    """Greedy answers from train eval's ids against the recorded ones; then llama.cpp's own tokenization of each
    prompt's text (what Ollama would feed it), and, where those ids differ, the answer from them."""
    answer = lambda ids: tok.decode(greedy(llm, ids, stops, max_new_tokens), skip_special_tokens=True)  # noqa: E731
    agree, differ, own = 0, [], {"same_ids": 0, "rows": 0, "answers_agree": 0, "differ": []}
    for e in examples:
        got, want = answer(e["prompt_ids"]), recorded[e["id"]]
        agree += got == want
        if got != want:
            differ.append({"id": e["id"], "llama.cpp": got, "train eval": want})
        text = tok.decode(e["prompt_ids"])
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        if ids == e["prompt_ids"]:
            own["same_ids"] += 1
            continue
        own["rows"] += 1
        retok = tok(text, add_special_tokens=False).input_ids == e["prompt_ids"]
        got = answer(ids)
        own["answers_agree"] += got == want
        own["differ"].append({"id": e["id"], "transformers_retokenizes_the_same": retok, "answer": got,
                              "train eval": want})
    return {"rows": len(examples), "answers_agree": agree, "differ": differ, "own_tokenization": own}


if __name__ == "__main__":
    sys.exit(main())
