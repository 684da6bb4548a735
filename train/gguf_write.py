"""Writing a Hugging Face causal LM as one GGUF file for llama.cpp: tensor names, layout, metadata, vocabulary.

Learned from llama.cpp's convert_hf_to_gguf.py, written with the `gguf` package's own name map and writer, for the
families we test (Llama, Qwen2, Qwen3, Gemma 3 text) and byte-level BPE vocabularies (Llama 3, Qwen, SmolLM2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from train.errors import UserError

ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma3_text": "GEMMA3"}  # HF model_type -> gguf's
TYPES = ("f16", "bf16", "q8_0")  # tensor types written; 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them
QK8_0 = 32  # Q8_0 block: a row not a multiple of it is written F16 (llama.cpp's fallback)


def check_family(model_type: str, config: dict) -> str:
    """The gguf architecture name for this model, or a one-line UserError saying what we write."""
    import gguf

    if model_type not in ARCHS:
        raise UserError(f"export: model_type {model_type!r} is not written to GGUF; supported: "
                        f"{', '.join(ARCHS)} (Llama, Qwen2, Qwen3, Gemma 3 text)")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise UserError("export: this Qwen2 model uses a sliding window (use_sliding_window: true), which llama.cpp's "
                        "qwen2 does not compute; export a model without it")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kinds = {r.get("rope_type", "default") for r in (rope.values() if model_type == "gemma3_text" else [rope])
             if isinstance(r, dict)}
    if kinds - {"default", "llama3", "linear"}:
        raise UserError(f"export: rope type {sorted(kinds)} is not written to GGUF; supported: default, llama3, linear")
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHS[model_type])]


def write(model, tok, path: Path, qtype: str, pre: str, stops: list[int]) -> None:
    """Write `model` (fp32, merged) and `tok` as GGUF `path` with tensors in `qtype`."""
    import gguf

    c = model.config
    arch = check_family(c.model_type, c.to_dict())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(Path(str(getattr(c, "_name_or_path", "")) or "model").name or "model")
    w.add_file_type(FILE_TYPES[qtype]())
    add_hparams(w, c, arch)
    add_vocab(w, tok, c.vocab_size, pre, stops)
    for name, data in tensors(model, arch):
        add_tensor(w, name, data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


FILE_TYPES = {"f16": lambda: __import__("gguf").LlamaFileType.MOSTLY_F16,
              "bf16": lambda: __import__("gguf").LlamaFileType.MOSTLY_BF16,
              "q8_0": lambda: __import__("gguf").LlamaFileType.MOSTLY_Q8_0}


def rope_of(c) -> dict:
    """The global layers' rope parameters (transformers 5: per layer type for Gemma 3)."""
    rope = getattr(c, "rope_parameters", None) or {}
    return rope.get("full_attention", rope) if "full_attention" in rope else rope


def add_hparams(w, c, arch: str) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = rope_of(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_vocab_size(c.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        w.add_rope_freq_base_swa(c.rope_parameters.get("sliding_attention", {}).get("rope_theta", 10000.0))


def tensors(model, arch: str):
    """(GGUF name, fp32 array) for every weight, in llama.cpp's layout: Llama's q/k rows permuted for its rope, Gemma's
    norms stored as 1 + weight (llama.cpp multiplies by the stored value), a tied lm_head left out."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()] if arch != "gemma3" else gguf.MODEL_ARCH.GEMMA3,
                                     c.num_hidden_layers)
    tied = getattr(c, "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"export: no GGUF name for tensor {key} ({arch})")
        data = t.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = permute(data, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        if arch == "gemma3" and key.endswith("norm.weight"):
            data = data + 1.0
        yield name, data
    if arch == "llama" and rope_of(c).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(c)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c) -> np.ndarray:
    """Llama 3.1's frequency factors, which llama.cpp reads from a rope_freqs tensor."""
    r = rope_of(c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    base, factor, old = r.get("rope_theta", 10000.0), r["factor"], r["original_max_position_embeddings"]
    lo_f, hi_f = r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)  # Llama 3.1's published values
    low, high = old / lo_f, old / hi_f
    out = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_tensor(w, name: str, data: np.ndarray, qtype: str) -> None:
    import gguf

    kind = gguf.GGMLQuantizationType
    if data.ndim == 1:
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == "bf16":
        w.add_tensor(name, gguf.quants.quantize(data, kind.BF16), raw_dtype=kind.BF16)
    elif qtype == "q8_0" and data.shape[-1] % QK8_0 == 0:
        w.add_tensor(name, gguf.quants.quantize(data, kind.Q8_0), raw_dtype=kind.Q8_0)
    else:
        w.add_tensor(name, data.astype(np.float16))


def add_vocab(w, tok, vocab_size: int, pre: str, stops: list[int]) -> None:
    """Byte-level BPE ("gpt2" in llama.cpp): tokens by id (padded to the model's rows), types, merges, the special
    ids, the chat template, and the end-of-turn id llama.cpp stops on."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) or spec["model"].get("type") != "BPE":
        raise UserError("export: the tokenizer is not a byte-level BPE (it looks like SentencePiece: Gemma, Llama 2, "
                        "Mistral); export writes byte-level BPE vocabularies (Llama 3, Qwen, SmolLM2) only")
    vocab = {i: t for t, i in tok.get_vocab().items()}
    special = set(tok.all_special_ids) | {i for i, a in tok.added_tokens_decoder.items() if a.special}
    added = set(tok.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(vocab.get(i, f"[PAD{i}]"))
        types.append(3 if i in special else 4 if i in added else 1 if i in vocab else 5)  # control/user/normal/unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:  # a vocabulary without merges (our tiny test models'): readers rebuild merges from scores (none here)
        w.add_token_scores([-float(i) for i in range(vocab_size)])
    add_special_ids(w, tok, stops)


def add_special_ids(w, tok, stops: list[int]) -> None:
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    if tok.unk_token_id is not None:
        w.add_unk_token_id(tok.unk_token_id)
    end_of_turn = [i for i in stops if i != tok.eos_token_id]
    if end_of_turn:
        w.add_eot_token_id(end_of_turn[0])
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)) and tok.bos_token_id is not None)
    w.add_add_eos_token(False)  # generation must not append an EOS to the prompt
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
