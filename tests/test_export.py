"""`train export`: a tiny run of each family we write (Llama, Qwen2, Qwen3, Gemma 3) exported to GGUF, reloaded with
transformers' GGUF loader, its logits and greedy answers compared with the merged model's; what we cannot write is
refused with one line, exit 2, nothing written."""

import dataclasses

import pytest

from families import FAMILIES, build_model, build_tokenizer, family_config, one_thread  # noqa: F401  (fixture)
from test_bad_inputs import expect  # noqa: F401  (fixture: exit 2, one `error:` line, nothing written)

pytestmark = pytest.mark.usefixtures("one_thread")
FIT = dict(train={"max_steps": 3, "grad_accum": 1, "save_every": 3, "eval_every": None, "lr": 1e-2},
           data={"max_rows": 24}, eval={"task": "numeric", "limit": 8, "batch_size": 8, "max_new_tokens": 4})


def qwen2_without_window(root):
    """The tiny Qwen2 as Qwen2.5's released models are: no sliding window (llama.cpp's qwen2 has none)."""
    from train import tiny

    family = dataclasses.replace(FAMILIES["qwen2"], config={})
    folder = root / "tiny-qwen2-full"
    folder.mkdir()
    tok = build_tokenizer(family)
    tok.save_pretrained(folder)
    tiny.save_weights(build_model(family, tok), folder)
    return str(folder)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def run(request, tmp_path_factory):
    from train.fit import fit

    root = tmp_path_factory.mktemp(request.param)
    model = {"name_or_path": qwen2_without_window(root)} if request.param == "qwen2" else {}
    return request.param, fit(family_config(root / "run", request.param, model=model, **FIT)).run


def test_export_reloads_with_the_merged_models_logits_and_answers(run, tmp_path):
    """f16: the reloaded file's logits within fp16 rounding of the merged model's, the same greedy answers, the same
    token ids from its vocabulary; the stop tokens and chat template travel in the file."""
    from gguf import GGUFReader

    from train.export import BOUNDS, export

    name, path = run
    out = tmp_path / f"{name}.gguf"
    got = export(str(path), str(out))
    n = got["answers"]
    assert got["max_rel_diff"] < BOUNDS["f16"] and got["answers_agree"] == n == 5, got  # 24 rows, 20% held out
    assert got["merge"]["answers_agree"] == n and got["merge"]["max_rel_diff"] < 1e-5
    assert got["max_weight_diff"] < 1e-6, got  # the file holds the merged weights, rounded to f16 and nothing else
    if name != "gemma3":  # transformers rebuilds Gemma vocabularies as SentencePiece only
        assert got["tokenizer_agrees"] == f"{n}/{n}", got
    if name in ("llama", "qwen2"):  # the file's metadata alone rebuilds the model (Qwen3, Gemma 3: see export.verify)
        assert got["config_from"] == "the GGUF file", got
    fields = GGUFReader(out).fields
    family = FAMILIES[name]
    tok = build_tokenizer(family)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.convert_tokens_to_ids(family.eos)
    assert fields["tokenizer.chat_template"].contents() == family.template
    if family.end_of_turn != family.eos:
        assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids(family.end_of_turn)
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert f'PARAMETER stop "{family.end_of_turn}"' in modelfile and "Price is $" in modelfile


def test_q8_0_and_bf16_within_their_bounds(run, tmp_path):
    from train.export import BOUNDS, export

    name, path = run
    if name != "llama":
        pytest.skip("one family is enough for the types: the layout is the same")
    f16 = export(str(path), str(tmp_path / "f16.gguf"))
    for qtype in ("bf16", "q8_0"):
        got = export(str(path), str(tmp_path / f"{qtype}.gguf"), qtype=qtype)
        assert f16["max_rel_diff"] <= got["max_rel_diff"] < BOUNDS[qtype], (qtype, got)
        assert got["answers_agree"] >= got["answers"] - 1, got
    assert got["bytes"] < 0.7 * f16["bytes"]  # q8_0: 8.5 bits a weight against 16


def test_only_an_earlier_export_is_replaced_and_only_with_overwrite(run, tmp_path, expect):  # noqa: F811
    """A second export to the same name is refused (exit 2, one line naming --overwrite, nothing changed); with
    --overwrite it replaces that file; a GGUF that is not ours (no .check.json: a base, say) is never replaced."""
    import os

    from train.cli import main
    from train.export import export

    name, path = run
    if name != "llama":
        pytest.skip("the file handling is the same for every family")
    out = tmp_path / "model.gguf"
    export(str(path), str(out))
    expect(["export", str(path), "--gguf", str(out)], "already exists", "pass --overwrite")
    os.utime(out, ns=(0, 0))
    assert main(["export", str(path), "--gguf", str(out), "--overwrite"]) == 0
    assert out.stat().st_mtime_ns > 0  # written anew
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF not ours")
    expect(["export", str(path), "--gguf", str(base), "--overwrite"], "is not an export of ours")


@pytest.mark.parametrize("name, needle", [("mistral", "model_type 'mistral' is not written to GGUF"),
                                          ("qwen2", "uses a sliding window")])
def test_a_family_we_do_not_write_is_one_line_exit_2(name, needle, tmp_path, expect):  # noqa: F811
    """Refused before any weights load: no file, no run change."""
    import json

    from train.config import dump_config

    run = tmp_path / "run" / "adapter"
    run.mkdir(parents=True)
    dump_config(family_config(tmp_path / "run", name), run / "config.yaml")
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    expect(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "out.gguf")], needle)
    assert not (tmp_path / "out.gguf").exists()


def test_llama3_rope_factors_give_transformers_frequencies():
    """rope_freqs (llama.cpp divides each base frequency by its factor) reproduces transformers' Llama 3.1 rope."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from train.gguf_write import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    c = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope, max_position_embeddings=131072)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    got = base / torch.from_numpy(llama3_rope_factors(c)).double()
    assert 1 < llama3_rope_factors(c).max() <= 8  # the range really is rescaled
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=0)


def test_a_vocabulary_with_merges_travels_in_the_file(tmp_path):
    """The merges are written (llama.cpp loads no byte-level BPE without them; scripts/llamacpp_families.py gives its
    tiny models some), in rank order, and transformers' GGUF tokenizer rebuilt from the file gives the same ids."""
    import gguf
    from transformers import AutoTokenizer

    from train import gguf_write, tiny

    merges = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ċ", "Ċ"))
    tok = tiny.build_tokenizer(merges=merges)
    text = "the cat\n\nsaw the hat"
    assert len(tok(text, add_special_tokens=False).input_ids) < len(text.encode())  # the merges really apply
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    gguf_write.add_vocab(w, tok, len(tok), "llama-bpe", [tok.eos_token_id])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in merges]
    assert "tokenizer.ggml.scores" not in fields
    reread = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert reread(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_modelfile_of_a_chat_run_renders_as_the_chat_template(name):
    """One user turn through the Modelfile's TEMPLATE (Go's range and role test done by hand) is the chat template's
    rendering, generation prompt included, without the BOS llama.cpp adds itself; every stop token is listed."""
    from pathlib import Path

    from train.export import modelfile

    family = FAMILIES[name]
    tok = build_tokenizer(family)
    cfg = family_config("/tmp/unused", name, data={"format": "messages"})
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids(family.end_of_turn)]
    text = modelfile(Path("x.gguf"), tok, cfg, stops)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    rendered = (template.replace("{{- range .Messages }}", "").replace("{{ end }}", "")
                .replace('{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}', "user")
                .replace("{{ .Role }}", "user").replace("{{ .Content }}", "What is 2+2?"))
    want = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True).removeprefix(tok.bos_token or "")
    assert rendered == want
    assert f'PARAMETER stop "{family.end_of_turn}"' in text and f'PARAMETER stop "{family.eos}"' in text
