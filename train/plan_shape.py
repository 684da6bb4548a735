"""What `train plan` knows of a model without its weights: the known bases' architectures (offline), the
config of model.name_or_path (folder, config.json, .gguf metadata, known base, hub) and its shape on the meta
device (every Linear, embedding and exact per-type parameter count). train/plan.py turns these into bytes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from train.config import ModelCfg
from train.errors import UserError
# --------------------------------------------------------------------------------------------
# Known bases: the architecture without the hub

# The config.json essentials of common bases, from each model's public config.json on the Hugging Face
# hub (https://huggingface.co/<id>/blob/main/config.json), so that `train plan` works offline for them.
# Only what sizes the model: the rest (RoPE, eps, token ids) keeps the config class's default, which
# moves no byte of the plan. The instruct variants share their base's architecture.
KNOWN_BASES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B: 8.03 B params, GQA 32/8, untied lm_head
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072),
    # Qwen/Qwen2.5-7B: 7.62 B params; q/k/v carry biases (Qwen2's architecture); the instruct config
    # says max_position_embeddings 32768, the base 131072
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=131072),
    # mistralai/Mistral-7B-v0.3: 7.25 B params, vocab extended to 32768
    "mistralai/Mistral-7B-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
        max_position_embeddings=32768),
    # google/gemma-2-9b: 9.24 B params, head_dim 256 (q_dim 4096 > hidden 3584), tied embeddings
    "google/gemma-2-9b": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
        tie_word_embeddings=True, max_position_embeddings=8192),
    # HuggingFaceTB/SmolLM2-135M: 135 M params, head_dim 64, tied embeddings
    "HuggingFaceTB/SmolLM2-135M": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192),
    # Qwen/Qwen3-8B: 8.19 B params, q/k norms (Qwen3's architecture), head_dim 128, untied (the 4B and smaller
    # tie their embeddings)
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=False, max_position_embeddings=40960),
    # google/gemma-3-1b-pt: 1.00 B params, text only (Gemma3ForCausalLM), 262,144-token vocabulary tied to the
    # embeddings (30% of the parameters), 5 sliding layers of 512 tokens to 1 global
    "google/gemma-3-1b-pt": dict(
        model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        tie_word_embeddings=True, max_position_embeddings=32768, sliding_window=512),
    # microsoft/Phi-3-mini-4k-instruct: 3.82 B params, q/k/v fused in qkv_proj and gate/up in gate_up_proj,
    # no GQA (32 KV heads), sliding window 2047; published as an instruct model only
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
        max_position_embeddings=4096, sliding_window=2047),
}
KNOWN_VARIANTS = {  # instruct/chat ids -> the base whose architecture they share
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
    "google/gemma-2-9b-it": "google/gemma-2-9b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
    "Qwen/Qwen3-8B-Base": "Qwen/Qwen3-8B",
    "google/gemma-3-1b-it": "google/gemma-3-1b-pt",
}


def known_base(name: str):
    """The transformers config of a KNOWN_BASES model (hub ids match case-insensitively), else None."""
    ids = {k.lower(): k for k in (*KNOWN_BASES, *KNOWN_VARIANTS)}
    key = ids.get(name.strip().lower())
    if key is None:
        return None
    from transformers import AutoConfig

    fields = dict(KNOWN_BASES[KNOWN_VARIANTS.get(key, key)])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# --------------------------------------------------------------------------------------------
# Model shape from config.json (meta device: no memory)


@dataclass(frozen=True)
class LinearInfo:
    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    arch: str
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[LinearInfo, ...]  # every nn.Linear, lm_head included
    lm_head: str | None  # name of the output embedding when it is a separate nn.Linear
    embeddings: tuple[tuple[str, int, int], ...]  # (name, num_embeddings, embedding_dim)
    params: dict[str, int]  # exact parameter counts per module type (see count_params_by_type)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def quantized_linears(self) -> list[LinearInfo]:
        """The Linear layers bitsandbytes quantizes: all but the output embedding (transformers skips it)."""
        return [l for l in self.linears if l.name != self.lm_head]


def model_shape(model_config) -> ModelShape:
    """Architecture sizes + exact per-module parameter counts, from the meta-device model."""
    return _model_shape(model_config.to_json_string(use_diff=False), type(model_config))


@functools.lru_cache(maxsize=16)
def _model_shape(config_json: str, config_cls) -> ModelShape:
    import json

    import torch

    from train.model import meta_model

    model_config = config_cls.from_dict(json.loads(config_json))
    try:
        meta = meta_model(model_config)  # meta device, tied embeddings tied (counted once)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise UserError(f"model.name_or_path: cannot build {type(model_config).__name__} as a causal LM: "
                        f"{str(e).splitlines()[0]}") from None
    out = meta.get_output_embeddings()
    names = {id(m): n for n, m in meta.named_modules()}
    lm_head = names.get(id(out)) if isinstance(out, torch.nn.Linear) else None

    linears, embeddings = [], []
    owner: dict[int, str] = {}  # id(param) -> module type, first owner wins (tied weights count once)
    for name, mod in meta.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears.append(LinearInfo(name, mod.in_features, mod.out_features, mod.bias is not None))
        elif isinstance(mod, torch.nn.Embedding):
            embeddings.append((name, mod.num_embeddings, mod.embedding_dim))
        for pname, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), _param_type(name, mod, pname, lm_head))
    params = {k: 0 for k in ("embedding", "linear", "linear_bias", "lm_head", "norm", "other")}
    for p in meta.parameters():  # deduplicated: a tied lm_head is the embedding
        params[owner[id(p)]] += p.numel()

    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    need = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if getattr(c, k, None) is None]
    if need:
        raise UserError(f"model.name_or_path: config.json lacks {', '.join(need)}; the planner needs them")
    heads = c.num_attention_heads
    return ModelShape(
        arch=type(meta).__name__,
        hidden=c.hidden_size,
        intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        vocab=c.vocab_size,
        linears=tuple(linears),
        lm_head=lm_head,
        embeddings=tuple(embeddings),
        params=params,
    )


def _param_type(module_name: str, mod, pname: str, lm_head: str | None) -> str:
    import torch

    if isinstance(mod, torch.nn.Linear):
        if module_name == lm_head:
            return "lm_head"
        return "linear" if pname == "weight" else "linear_bias"
    if isinstance(mod, torch.nn.Embedding):
        return "embedding"
    if "norm" in type(mod).__name__.lower() or "norm" in module_name.rsplit(".", 1)[-1].lower():
        return "norm"
    return "other"


def count_params_by_type(model_config) -> dict[str, int]:
    """Exact parameter counts: embedding, linear (quantizable weights), linear_bias, lm_head, norm, other.

    A tied lm_head shares the embedding matrix and is counted once, under embedding.
    """
    return dict(model_shape(model_config).params)


def plan_model_config(m: ModelCfg):
    """The transformers config of model.name_or_path, reading no weights: a builtin, a .gguf file (metadata only:
    no conversion), a config.json, a local folder (as train/model.py resolve_model_path reads the name), a known
    base (KNOWN_BASES, no network), else the hub's config.json. Raises UserError with the fix when none has it."""
    import os
    from pathlib import Path

    from train import gguf, model, tiny

    name = m.name_or_path
    if tiny.is_builtin(name):
        return model.load_model_config(str(tiny.materialize(name)), m)
    if gguf.is_gguf(name):
        return gguf_config(Path(name).expanduser())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return model.load_model_config(str(path), m)
    if (folder := model.local_model_dir(name)) is not None:
        return model.load_model_config(str(folder), m)
    known = known_base(name)
    if known is not None:
        return known
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except OSError as e:
        why = ("the hub is offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1"
               else f"the hub did not give its config.json ({str(e).splitlines()[0]})")
        raise UserError(f"model.name_or_path: {name} is not a base `train plan` knows offline and {why}; pass a "
                        "local model folder or its config.json (or a .gguf file) as model.name_or_path") from None
    except ValueError:
        return model.load_model_config(name, m)  # custom code and the like: the loader's own one-line errors


def gguf_config(path):
    """A .gguf file's architecture from its metadata (transformers' GGUF reader, the `gguf` package): no
    tensor is dequantized, so planning never starts the conversion train/model.py does before a fit."""
    if not path.is_file():
        raise UserError(f"model.name_or_path: {path}: no such file; give the path to a .gguf file")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent.resolve()), gguf_file=path.name)
    except ImportError:
        raise UserError(f"model.name_or_path: {path}: reading GGUF files needs the `gguf` package; "
                        "pip install gguf") from None
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise UserError(f"model.name_or_path: {path}: cannot read the architecture from this GGUF "
                        f"({str(e).splitlines()[0]})") from None
