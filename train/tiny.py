"""`builtin:tiny-llama`: a seeded, randomly initialised tiny Llama with a byte-level tokenizer.

It exists so the demo and the tests run offline on a CPU: nothing is downloaded, and the same
seed always builds the same weights. It is materialised once to a cache directory and then loaded
through the exact same `from_pretrained` + 4-bit path as any real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("tiny-llama",)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A minimal chat format: each turn is "<|role|>content<|end|>"; the assistant turn's <|end|> is
# what the model learns to stop on.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Widths are multiples of 32 so bitsandbytes' CPU 4-bit kernels accept every layer.
TINY_LLAMA = dict(
    hidden_size=128,  # small enough for CPU training in seconds, big enough to learn the demo task
    intermediate_size=384,  # 3x hidden, as in Llama
    num_hidden_layers=4,
    num_attention_heads=4,  # head_dim 32
    num_key_value_heads=2,  # grouped-query attention, as in Llama 3
    max_position_embeddings=1024,
    vocab_size=288,  # 256 bytes + 8 special tokens, padded up to a multiple of 32
    tie_word_embeddings=False,
    # Frozen random weights at the usual std 0.02 cap the logits near +-2.5 (|row| x |normed hidden|),
    # so no adapter could make confident predictions; 0.1 leaves the head expressive.
    initializer_range=0.1,
)
TINY_SEED = 1234  # fixed: every machine builds the identical base model


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    base = os.environ.get("QLORA_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qlora-train"
    )
    return Path(base)


def materialize(name: str) -> Path:
    """Build builtin model `name` into the cache (once) and return its directory."""
    from train.errors import UserError

    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTINS:
        raise UserError(f"model.name_or_path: unknown builtin {name!r}; available: builtin:tiny-llama")
    target = cache_root() / f"{key}-v2"  # bump when TINY_LLAMA changes
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
    try:
        build_tokenizer().save_pretrained(tmp)
        save_weights(build_model(), tmp)
        os.replace(tmp, target)  # atomic: concurrent builders or a kill never leave half a model
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_weights(model, directory: Path) -> None:
    """config.json + model.safetensors, written directly: under a distributed launch every rank may
    build the model, and transformers' save_pretrained writes nothing on ranks other than 0."""
    from safetensors.torch import save_file

    model.config.to_json_file(directory / "config.json")
    model.generation_config.to_json_file(directory / "generation_config.json")
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:  # tied weights (lm_head = embeddings) are stored once, as transformers does
            seen.add(v.data_ptr())
            tensors[k] = v.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def build_tokenizer(special_tokens=tuple(SPECIAL_TOKENS), chat_template: str = CHAT_TEMPLATE, bos: str | None = "<s>",
                    eos: str = "</s>", pad: str | None = "<pad>", unk: str | None = "<unk>",
                    merges: tuple[tuple[str, str], ...] = ()):
    """Byte-level BPE, by default with no merges: any UTF-8 text round-trips, nothing to download. Special tokens
    take ids 0.. in the order given, then the 256 bytes, then one token per merge (pairs of byte-level strings, e.g.
    ("Ġ", "t"): llama.cpp loads no BPE vocabulary without merges); the defaults are builtin:tiny-llama's, and a
    tiny model of another family passes its own tokens and chat template (tests/families.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    vocab.update({ch: len(special_tokens) + i for i, ch in enumerate(byte_chars)})
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(special_tokens))
    named = (bos, eos, pad, unk)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in special_tokens if t not in named],
        chat_template=chat_template,
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )
    tok.add_bos_token = bos is not None  # families without a BOS token (Qwen) start with the text itself
    return tok


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_LLAMA, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(TINY_SEED)
    return LlamaForCausalLM(config)
