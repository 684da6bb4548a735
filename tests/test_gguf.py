"""GGUF as a model source: a tiny GGUF written in-process converts to the same model and fine-tunes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, small_config


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py): transformers undoes it when it reads a GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TENSOR_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(path, model, tok) -> None:
    """builtin:tiny-llama written the way llama.cpp writes a Llama: F32 tensors, a gpt2-style BPE vocab."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama test")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    # BPE needs a merge list and each merge's result in the vocabulary: one merge, into the first padding slot
    tokens = [t for t, _ in vocab] + ["ĠĠ"] + [f"<extra_{i}>" for i in range(c.vocab_size - len(vocab) - 1)]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, name in TENSOR_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif name == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from train import tiny

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, tiny.build_model(), tiny.build_tokenizer())
    return path


def test_one_string_field_reads_as_ggufs_own_reader_has_it(tiny_gguf):
    """train.gguf.string_field skips arrays (the vocabulary, its types, the merges) and numbers to the key: every
    string field equals gguf's GGUFReader's, the chat template written after the arrays included; None for a
    missing key, a number, an array, or a file that is not GGUF."""
    from gguf import GGUFReader, GGUFValueType

    from train import gguf

    fields = GGUFReader(tiny_gguf).fields
    strings = {k: f.contents() for k, f in fields.items() if f.types == [GGUFValueType.STRING]}
    assert {"general.architecture", "tokenizer.ggml.model", "tokenizer.chat_template"} <= set(strings)
    assert list(fields).index("tokenizer.chat_template") > list(fields).index("tokenizer.ggml.merges")
    for key, want in strings.items():
        assert gguf.string_field(str(tiny_gguf), key) == want, key
    for key in ("no.such.key", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.tokens"):
        assert gguf.string_field(str(tiny_gguf), key) is None
    assert gguf.string_field(__file__, "general.architecture") is None


def test_gguf_converts_once_to_the_same_model(tiny_gguf, caplog, monkeypatch):
    """The cached folder holds the GGUF's own weights (bf16 of the F32 file) and tokenizer; the second
    resolve reuses it without converting, parsing or hashing the file again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train import gguf, tiny

    with caplog.at_level("INFO", logger="train"):
        folder = gguf.resolve(str(tiny_gguf))
        reads = []
        monkeypatch.setattr(gguf, "check_readable", lambda path: reads.append(path))
        monkeypatch.setattr(gguf.hashlib, "sha256", lambda: reads.append("hash"))
        again = gguf.resolve(str(tiny_gguf))
    assert folder == again and (folder / gguf.COMPLETE).is_file()
    assert sum("converting" in r.message for r in caplog.records) == 1
    assert reads == []  # a converted file is neither parsed (~10 s for a real vocabulary) nor hashed twice

    ref_dir = tiny.materialize("builtin:tiny-llama")
    ref, ref_tok = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16), AutoTokenizer.from_pretrained(ref_dir)
    got, got_tok = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), AutoTokenizer.from_pretrained(folder)
    text = "How much does this cost? A steel kettle, 2 l."
    assert got_tok(text).input_ids[-12:] == ref_tok(text).input_ids[-12:]
    ids = torch.tensor([ref_tok(text).input_ids])
    torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_gguf_fine_tunes_through_the_nf4_path(tiny_gguf, tmp_path):
    """`model.name_or_path: x.gguf` trains like any base: 4-bit layers, loss falls, adapter saved."""
    import bitsandbytes as bnb

    from train.fit import fit

    cfg = small_config(tmp_path / "run", model={"name_or_path": str(tiny_gguf)},
                       train={"max_steps": 8, "save_every": 8, "eval_every": None}, eval={"task": "none"})
    fitted = fit(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in fitted.model.modules())
    losses = [e["loss"] for e in fitted_losses(tmp_path / "run")]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


def fitted_losses(run):
    import json

    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


@pytest.mark.parametrize("content, why", [(b"not a gguf at all" * 4, "not a readable GGUF"), (None, "no such file")])
def test_unreadable_gguf_is_one_line_exit_2(tmp_path, content, why):
    path = tmp_path / "broken.gguf"
    if content is not None:
        path.write_bytes(content)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: {path}}}\ndata: {{train: {REPO}/data/demo/train.jsonl}}\n"
                   f"run: {{output_dir: {tmp_path}/run}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "train", "fit", str(cfg)], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.name_or_path:") and str(path) in last and why in last
    assert not (tmp_path / "run").exists()  # nothing written for a bad model


RANK_SCRIPT = """
import json, logging, sys
import torch
from transformers import AutoModelForCausalLM
from train import gguf

logging.basicConfig(level=logging.INFO)
folder = gguf.resolve(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
print(json.dumps({"folder": str(folder), "sum": sum(p.double().sum().item() for p in model.parameters())}))
"""


def test_two_ranks_convert_once_and_both_load_the_folder(tiny_gguf, tmp_path):
    """torchrun, 2 CPU processes (gloo), a leftover of a killed conversion in the cache: the main process converts
    (once) while the other waits, and both load the same intact folder."""
    import json

    from train import gguf, tiny

    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QLORA_TRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    os.environ["QLORA_TRAIN_CACHE"], saved = str(cache), os.environ["QLORA_TRAIN_CACHE"]
    try:
        leftover = gguf.cached_folder(tiny_gguf)
    finally:
        os.environ["QLORA_TRAIN_CACHE"] = saved
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # a killed conversion: no COMPLETE marker
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), str(tiny_gguf)], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=120, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2 and ranks[0] == ranks[1] and ranks[0]["folder"] == str(leftover)
    assert r.stderr.count("converting tiny-llama.gguf") == 1, r.stderr[-3000:]
    ref = sum(p.double().sum().item() for p in tiny.build_model().to(torch.bfloat16).float().parameters())
    assert ranks[0]["sum"] == pytest.approx(ref, rel=1e-9)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
