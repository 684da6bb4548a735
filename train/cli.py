"""Command line: `python -m train {fit,eval,merge,export,generate,plan} ...`. Bad input -> one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from train.errors import Interrupted, UserError

EXIT_USER_ERROR = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="QLoRA fine-tuning: fit, evaluate, merge.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = p.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train a LoRA adapter on a quantized base")
    fit.add_argument("config", help="YAML config file (see configs/demo.yaml)")
    fit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    fit.add_argument("--overwrite", action="store_true", help="replace our outputs in run.output_dir")

    ev = sub.add_parser("eval", help="evaluate base vs base+adapter on the eval rows")
    ev.add_argument("run", help="run directory (or adapter directory)")
    ev.add_argument("--data", help="evaluate on this file instead of the run's eval data")
    ev.add_argument("--limit", type=int, help="evaluate at most N rows: a random sample seeded by run.seed, kept in "
                    "file order (--set eval.sample=first takes the first N)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    mg = sub.add_parser("merge", help="merge the adapter into the dequantized base it was trained on; report the gap")
    mg.add_argument("run", help="run directory (or adapter directory)")
    mg.add_argument("--out", required=True, help="directory for the merged model")
    mg.add_argument("--overwrite", action="store_true", help="replace a previous merge's output in --out (only that)")
    mg.add_argument("--base", choices=("dequantized", "original"), default="dequantized",
                    help="dequantized (default): the 4-bit base as trained; original: the base's unquantized weights")
    mg.add_argument("--limit", type=int, help="eval rows the merged model is compared on (default: eval.limit)")
    mg.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                    help="saved weights (default auto: the base's own dtype, so the merged model is the base's size)")

    ex = sub.add_parser("export", help="write the merged model as one GGUF file (llama.cpp, Ollama) and check it")
    ex.add_argument("run", help="run directory (or adapter directory)")
    ex.add_argument("--gguf", required=True, help="the .gguf file to write")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export at --gguf (only that)")
    ex.add_argument("--type", default="f16", choices=("f16", "bf16", "q8_0"), help="tensor type (default f16: "
                    "reloads within fp16 rounding; q8_0: half the size)")
    ex.add_argument("--limit", type=int, help="eval rows the file is checked on (default: eval.limit)")

    gen = sub.add_parser("generate", help="greedy generation with the adapter, for a quick look",
                         description="Each --prompt is wrapped as the run's training prompts were: data.format "
                         "prompt_completion puts it into the data.prompt template's one {field} (a template with "
                         "several fields needs --raw and the whole prompt); alpaca makes it the instruction (no "
                         "input); messages sends it as one user turn through the chat template; text sends it "
                         "unchanged. Prints each prompt as given, then '--- answer ---' and the answer.")
    gen.add_argument("run", help="run directory (or adapter directory)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    wrap = gen.add_mutually_exclusive_group()
    wrap.add_argument("--raw", dest="wrap", action="store_const", const="raw",
                      help="send each --prompt unchanged, without the run's template")
    wrap.add_argument("--chat", dest="wrap", action="store_const", const="chat",
                      help="send each --prompt as one user turn of the tokenizer's chat template, whatever the run's "
                      "data.format (e.g. to check a fine-tuned instruct model still chats)")
    gen.set_defaults(wrap="run")
    gen.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens of the run")

    pl = sub.add_parser("plan", help="predict peak GPU memory before loading any weights")
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    pl.add_argument("--gpu-gb", type=float, help="GPU memory to check the plan against (GB)")
    pl.add_argument("--tokens", type=int, help="tokens in the largest micro-batch (default: the worst case, "
                    "train.batch_size x data.max_length)")
    return p


def setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="[train] %(message)s", stream=sys.stderr)
    if not debug:
        warnings.filterwarnings("ignore")
        # bitsandbytes announces an optional CPU kernel package on every import; on a CPU with AVX-512 bf16 it also
        # fetches that kernel from the hub at import, and `kernels` warns when offline: neither is actionable here
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        logging.getLogger("kernels").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        quiet_library_progress()


def quiet_library_progress() -> None:
    """Weight-loading and dataset-map bars add noise (and precede error lines); the training bar stays."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    from train.config import load_config

    if args.command == "fit":
        from train.fit import fit

        fit(load_config(args.config, args.set), overwrite=args.overwrite)
    elif args.command == "eval":
        from train.eval.evaluate import evaluate_run

        evaluate_run(args.run, data=args.data, limit=args.limit, overrides=args.set)
    elif args.command == "merge":
        from train.merge import merge

        merge(args.run, args.out, overwrite=args.overwrite, base=args.base, limit=args.limit, dtype=args.dtype)
    elif args.command == "export":
        from train.export import export

        export(args.run, args.gguf, qtype=args.type, limit=args.limit, overwrite=args.overwrite)
    elif args.command == "generate":
        from train.eval.evaluate import GENERATION_SEPARATOR, format_generation, generate_text

        answers = generate_text(args.run, args.prompt, args.max_new_tokens, wrap=args.wrap)
        print(f"\n{GENERATION_SEPARATOR}\n".join(format_generation(p, a) for p, a in zip(args.prompt, answers)))
    elif args.command == "plan":
        from train.plan import plan_main

        return plan_main(args.config, args.set, args.gpu_gb, args.tokens)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
