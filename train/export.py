"""`train export RUN --gguf OUT.gguf`: the merged model (`train merge`'s default) as one GGUF file, checked.

The merge is `train merge`'s (the dequantized NF4 base + adapter, in fp32, compared with the NF4 + adapter model on
the run's eval rows); gguf_write.py writes it for llama.cpp. The file is then loaded back with transformers' GGUF
loader and compared with the merged model on the same rows: the largest logit gap and how many greedy answers agree
(OUT.gguf.check.json). An Ollama Modelfile is written beside it (OUT.Modelfile).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from train import adapter as adapter_lib
from train import gguf_write
from train.errors import UserError

log = logging.getLogger("train")

# the reloaded file's logit gap vs the merged model, relative to the logit scale: the rounding each type allows
# (f16: 11-bit mantissa; bf16: 8-bit; q8_0: 8-bit integers per block of 32), measured x ~10 on the tiny families
BOUNDS = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3_text": "default"}  # llama.cpp pre-tokenizer
# names by family, when the base was not a GGUF file that names its own


def export(target: str, out: str, qtype: str = "f16", limit: int | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    from train import merge as merge_lib
    from train.model import resolve_model_path

    out_path = check_out(out, qtype, overwrite)
    adapter_dir = adapter_lib.find_adapter(target)
    cfg = adapter_lib.load_config_of(adapter_dir)
    config = base_config(resolve_model_path(cfg.model))
    gguf_write.check_family(config.get("model_type", "?"), config)  # refused before any weights load
    built = merge_lib.build(target, "dequantized", limit, dtype="float32")  # unrounded: the file's type rounds once
    merged, tok, cfg = built.model, built.tok, built.cfg
    start = time.perf_counter()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    stops = stop_ids(merged, tok)
    gguf_write.write(merged, tok, tmp, qtype, pre_tokenizer(cfg, config), stops)
    os.replace(tmp, out_path)
    seconds = time.perf_counter() - start
    check = verify(out_path, built, qtype)
    result = {"file": str(out_path), "type": qtype, "bytes": out_path.stat().st_size, "write_seconds": seconds,
              "merge": {"max_rel_diff": built.report["gap"]["max_rel_diff"], "answers_agree": built.report["answers_agree"],
                        "answers": built.report["answers"]}, **check}
    Path(f"{out_path}.check.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    out_path.with_suffix(".Modelfile").write_text(modelfile(out_path, tok, cfg, stops), encoding="utf-8")
    log.info("exported %s (%s, %.1f MB, %.1f s): reloaded, max |logit gap| vs the merged model %.4g (%.2e of the "
             "logit scale, bound %.0e); greedy answers agree on %d/%d", out_path, qtype, result["bytes"] / 1e6,
             seconds, check["max_abs_diff"], check["max_rel_diff"], BOUNDS[qtype], check["answers_agree"],
             check["answers"])
    if check["max_rel_diff"] > BOUNDS[qtype]:
        raise RuntimeError(f"{out_path}: the reloaded GGUF differs from the merged model beyond the {qtype} bound: "
                           f"{check}; the file is kept for inspection")
    return result


def check_out(out: str, qtype: str, overwrite: bool = False) -> Path:
    """The file to write. One that exists is replaced only with --overwrite and only where it is an earlier export
    (its OUT.gguf.check.json beside it): never a GGUF of someone else's, such as the base the run started from."""
    if qtype not in gguf_write.TYPES:
        raise UserError(f"--type {qtype}: choose one of {', '.join(gguf_write.TYPES)}")
    path = Path(out)
    if path.suffix.lower() != ".gguf":
        raise UserError(f"--gguf {out}: give a file name ending in .gguf")
    ours = Path(f"{path}.check.json").is_file()
    if path.exists() and not (overwrite and ours and path.is_file()):
        fix = "pass --overwrite to replace that earlier export, or choose" if ours else "choose"
        raise UserError(f"--gguf {out}: already exists{'' if ours else ' and is not an export of ours'}; {fix} "
                        "a new file name")
    if not path.parent.is_dir():
        raise UserError(f"--gguf {out}: folder {path.parent} does not exist; create it or choose another path")
    return path


def base_config(path: str) -> dict[str, Any]:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"model.name_or_path: {path}: export needs a local base with config.json (a hub id must be "
                        "downloaded first)")
    return json.loads(config.read_text(encoding="utf-8"))


def pre_tokenizer(cfg, config: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's own when the base was one, else the family's usual one."""
    from train import gguf

    if gguf.is_gguf(cfg.model.name_or_path):
        name = gguf.string_field(cfg.model.name_or_path, "tokenizer.ggml.pre")
        if name is not None:
            return name
    return PRE[config["model_type"]]


def stop_ids(model, tok) -> list[int]:
    from train.eval import evaluate

    return evaluate.stop_ids(model, tok)


def verify(path: Path, built, qtype: str) -> dict[str, Any]:
    """Reload `path` with transformers' GGUF loader (dequantized to fp32) and score it on the merged model's rows.
    Where that loader reads the file's config differently from the model's (it reads neither Gemma 3's layer pattern
    nor its attention scale, nor Qwen3's head_dim), the reload takes the merged model's config, and the check covers
    the tensors (names, layout, norms); the report names those keys."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from train import merge as merge_lib

    merged, tok, cfg = built.model, built.tok, built.cfg
    read = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    unread = config_unread(read, merged.config)
    # the config read from the file once (transformers re-parses the whole file for each read: 7 s for SmolLM2)
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                    use_kernels=False,
                                                    config=merged.config if unread else read).eval()
    reloaded.generation_config = merged.generation_config  # the same stop ids: the answers differ only by weights
    logits, answers = merge_lib.score(reloaded, tok, built.rows, cfg, quantized=False)
    gap = merge_lib.compare(built.logits, logits)
    agree = sum(a == b for a, b in zip(built.answers, answers))
    return {**gap, "answers_agree": agree, "answers": len(answers), "rows_from": built.report["rows_from"],
            "max_weight_diff": weight_diff(reloaded, merged, qtype),
            "config_from": f"the merged model (transformers' GGUF loader misreads {', '.join(unread)})" if unread
            else "the GGUF file",
            "tokenizer_agrees": tokenizer_agrees(path, tok, built.rows)}


def tokenizer_agrees(path: Path, tok, rows) -> str:
    """How many rows the GGUF's tokenizer, as transformers rebuilds it, encodes to the run's token ids."""
    from transformers import AutoTokenizer

    try:
        again = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 (the tokenizers library raises a plain Exception for a vocabulary it refuses)
        return f"not checked: transformers cannot rebuild it ({str(e).splitlines()[0][:80]})"
    texts = [tok.decode(r["ids"]) for r in rows]
    same = sum(again.encode(t, add_special_tokens=False) == tok.encode(t, add_special_tokens=False) for t in texts)
    return f"{same}/{len(texts)}"


def modelfile(path: Path, tok, cfg, stops: list[int]) -> str:
    """An Ollama Modelfile: the run's own prompt format (the chat template's turns for data.format messages, else
    the raw prompt the model was trained on), every stop token, greedy decoding as `train eval` scores."""
    if cfg.data.format == "messages":
        template = '{{- range .Messages }}' + turn_template(tok) + '{{ end }}' + assistant_prefix(tok)
    else:
        template = prompt_template(cfg)
    stop_lines = "".join(f'PARAMETER stop "{tok.convert_ids_to_tokens(i)}"\n' for i in stops)
    return (f"FROM ./{path.name}\nTEMPLATE \"\"\"{template}\"\"\"\n{stop_lines}PARAMETER temperature 0\n"
            f"PARAMETER num_predict {cfg.eval.max_new_tokens}\n")


def turn_template(tok) -> str:
    """One message as the chat template renders it, with Ollama's {{ .Role }} and {{ .Content }} in place."""
    one = tok.apply_chat_template([{"role": "user", "content": "CONTENT"}], tokenize=False)
    bos = tok.bos_token or ""
    role = "{{ .Role }}"
    if "<start_of_turn>" in one:  # Gemma calls the assistant "model"
        role = '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}'
    return one.removeprefix(bos).replace("user", role, 1).replace("CONTENT", "{{ .Content }}")


def assistant_prefix(tok) -> str:
    """What the chat template adds to open the assistant's turn."""
    msg = [{"role": "user", "content": "x"}]
    with_prefix = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    return with_prefix[len(tok.apply_chat_template(msg, tokenize=False)):]


def prompt_template(cfg) -> str:
    """data.prompt with its one field as Ollama's {{ .Prompt }} (`train generate`'s wrapping); else the raw prompt."""
    import string

    if cfg.data.format != "prompt_completion":
        return "{{ .Prompt }}"
    parts = list(string.Formatter().parse(cfg.data.prompt))
    if len({name for _, name, _, _ in parts if name is not None}) != 1:
        return "{{ .Prompt }}"
    return "".join(text + ("{{ .Prompt }}" if name is not None else "") for text, name, _, _ in parts)


ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "sliding_window", "layer_types",
             "query_pre_attn_scalar")  # what shapes the computation; compared between the file's and the model's


def config_unread(read, config) -> list[str]:
    """The ARCH_KEYS transformers' GGUF loader read (`read`, its config of the file) otherwise than `config` has them."""
    return [k for k in ARCH_KEYS if not same(arch_value(read, k), arch_value(config, k))]


def arch_value(config, key: str):
    value = getattr(config, key, None)
    if key == "head_dim" and value is None:  # transformers' default where a config leaves it out
        return config.hidden_size // config.num_attention_heads
    return value


def same(a, b) -> bool:
    """Equal, floats to GGUF's float32 (1e-6 is stored as 9.99999997e-07)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


@torch.no_grad()
def weight_diff(reloaded, merged, qtype: str) -> float | None:
    """Largest |reloaded - merged| over all weights, the merged ones rounded as the file stores them (matrices in
    f16/bf16, vectors in F32): 0 up to float32 rounding when the file holds exactly the merged model. None for q8_0
    (its blocks round differently)."""
    if qtype == "q8_0":
        return None
    dtype = torch.float16 if qtype == "f16" else torch.bfloat16
    mine = merged.state_dict()
    worst = 0.0
    for key, got in reloaded.state_dict().items():
        want = mine[key] if got.ndim == 1 else mine[key].to(dtype).float()
        worst = max(worst, (got.float() - want).abs().max().item())
    return worst
