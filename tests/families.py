"""Tiny random models of every family the README names, for the CPU matrix (tests/test_families.py) and the
GPU check (tests/test_gpu.py): built in-process from transformers' config classes, with each family's
distinguishing parts (Qwen2's q/k/v biases and sliding layers, Qwen3's q/k norms, Mistral's sliding window,
Gemma 2's softcaps, Gemma 3's sliding and global layers, Phi-3's fused projections), its special tokens and a
small jinja copy of its chat template. Nothing is downloaded.

Every width is a multiple of 32, so bitsandbytes' CPU 4-bit kernels quantize every Linear (the real NF4
path), and every sliding window is shorter than the demo rows (~60-90 tokens), so the window really cuts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

WINDOW = 16  # sliding window of the tiny models: far shorter than a demo row, so every row crosses it

COMMON = dict(
    hidden_size=64,  # the smallest width that keeps 2 heads of 32 (bitsandbytes' CPU multiple)
    intermediate_size=128,  # 2x hidden: the MLP stays cheap
    num_hidden_layers=2,  # one sliding and one global layer where a family mixes them
    num_attention_heads=2,
    num_key_value_heads=1,  # grouped-query attention, as in every family here
    head_dim=32,  # Gemma's default is 256: set it for all
    max_position_embeddings=512,  # longer than any test row
    vocab_size=320,  # 256 bytes + up to 64 special tokens, a multiple of 32
    # frozen random weights at the usual std 0.02 leave the logits flat, and six steps of LoRA cannot move
    # them far; 0.1 (train/tiny.py's choice) lets the loss fall within a few steps
    initializer_range=0.1,
)

# Chat templates: the shape of each family's real template, cut down to what a turn needs
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}"
         "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

GEMMA_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")  # Gemma's ids 0-3, 106, 107


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers config class; AutoModelForCausalLM picks the model class from it
    config: dict  # what makes this family itself, on top of COMMON
    special: tuple[str, ...]  # special tokens, ids 0.. in this order
    bos: str | None
    eos: str  # the tokenizer's EOS (a base model's): what prompt_completion training appends
    pad: str | None
    end_of_turn: str  # what the chat template closes an assistant turn with
    stops: tuple[str, ...]  # generation_config.eos_token_id, as the family's instruct models list them
    template: str
    targets: tuple[str, ...]  # an explicit lora.target_modules list for this family
    model_class: str = ""  # the class transformers must build (checked in the tests)
    extra: dict = field(default_factory=dict)


FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaConfig", {}, ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|end_of_text|>",
           "<|finetune_right_pad_id|>", "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>"), LLAMA3,
           ("q_proj", "v_proj"), "LlamaForCausalLM"),
    # Qwen2.5: q/k/v biases; with use_sliding_window, layers from max_window_layers on slide
    Family("qwen2", "Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>", "<|endoftext|>", "<|im_end|>",
           ("<|im_end|>", "<|endoftext|>"), CHATML, ("q_proj", "k_proj", "v_proj"), "Qwen2ForCausalLM"),
    Family("qwen3", "Qwen3Config", {}, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>",
           "<|endoftext|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), CHATML, ("q_proj", "k_proj", "o_proj"),
           "Qwen3ForCausalLM"),
    Family("mistral", "MistralConfig", dict(sliding_window=WINDOW), ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
           "<s>", "</s>", None, "</s>", ("</s>",), MISTRAL, ("q_proj", "v_proj", "down_proj"), "MistralForCausalLM"),
    # Gemma 2: attention logits capped at 50, final logits at 30, every other layer sliding, tied embeddings
    Family("gemma2", "Gemma2Config", dict(sliding_window=WINDOW, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
           final_logit_softcapping=30.0, tie_word_embeddings=True), GEMMA_TOKENS, "<bos>", "<eos>", "<pad>",
           "<end_of_turn>", ("<eos>", "<end_of_turn>"), GEMMA, ("q_proj", "v_proj", "gate_proj"), "Gemma2ForCausalLM"),
    # Gemma 3 (text-only): a sliding layer then a global one (the real models: 5 sliding to 1 global)
    Family("gemma3", "Gemma3TextConfig", dict(sliding_window=WINDOW, query_pre_attn_scalar=32, tie_word_embeddings=True,
           layer_types=["sliding_attention", "full_attention"]), GEMMA_TOKENS, "<bos>", "<eos>", "<pad>",
           "<end_of_turn>", ("<eos>", "<end_of_turn>"), GEMMA, ("q_proj", "v_proj", "o_proj"), "Gemma3ForCausalLM"),
    # Phi-3: q/k/v in one qkv_proj, gate/up in one gate_up_proj; Phi-3-mini-4k slides over 2047 tokens
    Family("phi3", "Phi3Config", dict(sliding_window=24), ("<unk>", "<s>", "<|endoftext|>", "<|user|>",
           "<|assistant|>", "<|system|>", "<|end|>"), "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>",
           ("<|endoftext|>", "<|end|>"), PHI3, ("qkv_proj", "gate_up_proj"), "Phi3ForCausalLM"),
)}

SEED = 4321  # fixed: the same family always builds the same weights


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a test module: the tiny models' ops are too small to split, and with two threads each
    op waits on the other (a 4-bit matmul of these widths: 0.8 ms on one thread, 48 ms on two, measured on a
    busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tokenizer(family: Family, merges: tuple[tuple[str, str], ...] = ()):
    from train import tiny

    return tiny.build_tokenizer(family.special, family.template, bos=family.bos, eos=family.eos, pad=family.pad,
                                unk="<unk>" if "<unk>" in family.special else None, merges=merges)


def model_config(family: Family, tok=None):
    """The transformers config of `family`'s tiny model, its token ids those of the family's tokenizer."""
    import transformers

    tok = tok or build_tokenizer(family)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    return getattr(transformers, family.config_class)(**{**COMMON, **family.config, **ids})


def build_model(family: Family, tok=None):
    """The random tiny model of `family`, fp32, its generation_config listing the family's stop tokens."""
    import torch
    import transformers

    tok = tok or build_tokenizer(family)
    config = model_config(family, tok)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in family.stops]
    return model


def materialize(name: str, root: Path | None = None) -> Path:
    """A model folder for family `name` (config.json, weights, generation_config.json, tokenizer), built once per
    root (default: the session's model cache, which conftest.py keeps private to the test session)."""
    from train import tiny

    family = FAMILIES[name]
    root = Path(root or tiny.cache_root()) / "families"
    target = root / f"tiny-{name}-v1"  # bump when a family's definition changes
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        tok = build_tokenizer(family)
        tok.save_pretrained(tmp)
        tiny.save_weights(build_model(family, tok), tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def family_config(output_dir, name: str, **sections):
    """conftest.small_config on family `name`'s tiny model, fp32 compute (this CPU has no fast bf16)."""
    from conftest import small_config

    model = {"name_or_path": str(materialize(name)), **sections.pop("model", {})}
    quant = {"compute_dtype": "float32", **sections.pop("quant", {})}
    return small_config(output_dir, model=model, quant=quant, **sections)
