"""scripts/bench.py's workload on CPU, without a GPU or a big write: the random model of another base (--base, issue
#20) has that base's widths and FLOP count, its weights load back for any family, and bad --base uses are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402  (scripts/ first on sys.path)
import bench_workload as wl  # noqa: E402

from train.model import meta_model  # noqa: E402


def linear_weights(cfg) -> int:
    return sum(m.weight.numel() for m in meta_model(cfg).modules() if isinstance(m, torch.nn.Linear))


def test_qwen_config_has_its_widths_and_the_tiny_tokenizers_ids():
    cfg = wl.model_config(base="Qwen/Qwen2.5-7B")
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3584, 18944, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (28, 4, 152064)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    assert not cfg.tie_word_embeddings and cfg.max_position_embeddings == 131072
    assert wl.model_config(base="qwen/qwen2.5-7b-instruct", positions=200_000).max_position_embeddings == 200_000
    assert wl.model_dir_name("Qwen/Qwen2.5-7B") == "model-qwen2.5-7b" != wl.model_dir_name(wl.DEFAULT_BASE)


@pytest.mark.parametrize("base", ["Qwen/Qwen2.5-7B", "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct"])
def test_matmul_params_are_the_meta_models_linear_weights(base):
    cfg = wl.model_config(base=base)
    assert wl.matmul_params(cfg) == linear_weights(cfg)


def test_matmul_params_by_hand():
    """Qwen2.5-7B: q/o h x h, k/v h x 512 (4 KV heads of 128), three h x i MLP weights, an untied head; Gemma-2-9b:
    q/o 3584 x 4096 (head_dim 256), k/v 3584 x 2048, its tied head once; Llama-3.1-8B: docs/benchmarks.md's 7.505e9."""
    h, i, vocab = 3584, 18944, 152064
    assert wl.matmul_params(wl.model_config(base="Qwen/Qwen2.5-7B")) == \
        28 * (2 * h * h + 2 * h * 512 + 3 * h * i) + h * vocab
    assert wl.matmul_params(wl.model_config(base="google/gemma-2-9b")) == \
        42 * (2 * h * 4096 + 2 * h * 2048 + 3 * h * 14336) + h * 256000
    assert wl.matmul_params(wl.model_config()) == 7_504_658_432


@pytest.mark.parametrize("model_type,extra", [("qwen2", {}), ("gemma2", {"tie_word_embeddings": True})])
def test_weights_of_another_family_load_back(tmp_path, model_type, extra):
    """write_weights on a tiny config of the family: Qwen2's q/k/v biases at 0, Gemma's norms (1 + w) at 0, a
    tied lm_head not written and tied on load; nothing missing, nothing unexpected."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=320,
                               **extra, **wl.TOKEN_IDS)
    cfg.save_pretrained(tmp_path)
    info = wl.write_weights(tmp_path, cfg)
    model, load = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not load["missing_keys"] and not load["unexpected_keys"]
    assert info["params"] == sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    norm = 0.0 if model_type == "gemma2" else 1.0
    assert all(bool((v == norm).all()) for k, v in state.items() if k.endswith("norm.weight"))
    biases = [v for k, v in state.items() if k.endswith(".bias")]
    assert (len(biases) == 6) == (model_type == "qwen2") and all(bool((b == 0).all()) for b in biases)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (model_type == "gemma2")


@pytest.mark.parametrize("argv,says", [
    (["--base", "acme/Llama-9B"], "--base: unknown base 'acme/Llama-9B'; known: meta-llama/Llama-3.1-8B, "),
    (["--tiny", "--base", "Qwen/Qwen2.5-7B"], "--tiny and --cpu bring their own model"),
    (["--cpu", "--model", "/tmp/m", "--base", "Qwen/Qwen2.5-7B"], "--tiny and --cpu bring their own model"),
    (["--base", "microsoft/Phi-3-mini-4k-instruct", "--ways", "c,unsloth"], "unsloth cannot run"),
    (["--base", "microsoft/Phi-3-mini-4k-instruct", "--plan-check", "--plan-stacks", "ours,unsloth"],
     "--plan-stacks unsloth cannot run"),
])
def test_bad_base_is_one_line(tmp_path, capsys, argv, says):
    assert bench.main([*argv, "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_plan_settings_and_known_names():
    assert wl.plan_settings("1x16384, 4X512") == [(1, 16384), (4, 512)]
    assert wl.resolve_base("GOOGLE/gemma-2-9b-it") == "google/gemma-2-9b" and wl.resolve_base("x/y") is None


def test_fused_layer_check_adds_qwens_biases(tmp_path):
    """The bench's fused-layer check (way c) on a tiny Qwen2 with nonzero q/k/v biases, dropout 0 (so it checks
    against fp32): biased and unbiased layers of one shape are both checked, and both agree with the reference
    (before the bias was added to it, q_proj's output was 0.83 off)."""
    from bench_measure import fused_layer_check
    from families import family_config
    from train import lora, model

    cfg = family_config(tmp_path / "run", "qwen2", lora={"dropout": 0.0, "kernel": "fused"})
    base = model.prepare_for_kbit(model.load_base(cfg, model.resolve_model_path(cfg.model), quiet=True), cfg)
    torch.manual_seed(0)
    peft_model = lora.wrap(base, cfg.lora)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or name.endswith("base_layer.bias"):  # B != 0 and real biases: every term counts
            p.data.normal_(0, 0.05 if "lora_B" in name else 1.0)
    out = fused_layer_check(peft_model, 16)
    assert {"64->64 +bias", "64->64", "64->32 +bias"} <= set(out)
    for row in out.values():
        assert max(row["max_rel_diff_vs_fp32"].values()) < 2e-2, row
