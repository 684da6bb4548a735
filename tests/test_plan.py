"""Unit tests for train.plan: hand-computed parameter counts and byte formulas, monotonicity, a
Llama-3.1-8B-shaped config on the meta device, the predicted peaks against the peaks measured on an H100
(docs/benchmarks.md), the offline model sources (folder, config.json, .gguf, known bases) and `plan_main`."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlamaConfig

from train import plan
from train.config import Config, DataCfg, LoraCfg, ModelCfg, QuantCfg, TrainCfg
from train.errors import UserError

# hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads (kv_dim 32), vocab 256
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, max_position_embeddings=512)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                max_position_embeddings=131072, rope_theta=500000.0)
# (in_features, out_features) of one tiny decoder layer's Linear layers, by hand
TINY_LAYER = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def make_cfg(**sections) -> Config:
    base = Config(model=ModelCfg(name_or_path="tiny"), data=DataCfg(train="train.jsonl", max_length=512),
                  train=TrainCfg(batch_size=2), lora=LoraCfg(r=8))
    return dataclasses.replace(base, **sections)


def with_(cfg: Config, section: str, **values) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


@pytest.fixture(scope="module")
def tiny():
    return LlamaConfig(**TINY)


@pytest.fixture(scope="module")
def llama8b():
    return LlamaConfig(**LLAMA_8B)


# ---------------------------------------------------------------- parameter counts


def test_tiny_param_counts_per_module_type(tiny):
    counts = plan.count_params_by_type(tiny)
    per_layer_linear = sum(i * o for i, o in TINY_LAYER.values())  # 36864
    assert per_layer_linear == 4096 + 2048 + 2048 + 4096 + 3 * 8192
    assert counts == {
        "embedding": 256 * 64,
        "linear": 2 * per_layer_linear,
        "linear_bias": 0,
        "lm_head": 256 * 64,
        "norm": 2 * 2 * 64 + 64,  # two RMSNorms per layer + the final norm
        "other": 0,
    }


def test_tied_lm_head_counted_once(tiny):
    tied = LlamaConfig(**{**TINY, "tie_word_embeddings": True})
    counts = plan.count_params_by_type(tied)
    assert counts["lm_head"] == 0 and counts["embedding"] == 256 * 64
    assert sum(counts.values()) == sum(plan.count_params_by_type(tiny).values()) - 256 * 64


def test_lm_head_is_not_quantized(tiny):
    shape = plan.model_shape(tiny)
    assert shape.lm_head == "lm_head"
    assert len(shape.quantized_linears()) == 2 * 7
    assert all(l.name != "lm_head" for l in shape.quantized_linears())


def test_llama_8b_exact_param_count(llama8b):
    counts = plan.count_params_by_type(llama8b)
    assert counts["embedding"] == counts["lm_head"] == 128256 * 4096
    assert counts["norm"] == (2 * 32 + 1) * 4096
    assert sum(counts.values()) == 8_030_261_248  # Llama 3.1 8B


# ---------------------------------------------------------------- LoRA


def test_lora_count_all_linear_by_hand(tiny):
    r = 8
    by_hand = 2 * sum(r * (i + o) for i, o in TINY_LAYER.values())  # 2 layers
    assert by_hand == 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert plan.lora_param_count(plan.model_shape(tiny), LoraCfg(r=r)) == by_hand


def test_lora_count_listed_and_regex_targets(tiny):
    shape = plan.model_shape(tiny)
    assert plan.lora_param_count(shape, LoraCfg(r=8, target_modules=["q_proj", "v_proj"])) == 2 * 8 * (128 + 96)
    assert plan.lora_param_count(shape, LoraCfg(r=4, target_modules=r".*\.mlp\.down_proj")) == 2 * 4 * (128 + 64)
    with pytest.raises(UserError, match="not found"):
        plan.lora_param_count(shape, LoraCfg(target_modules=["qkv_proj"]))


def test_llama_8b_lora_r16_all_linear(llama8b):
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert plan.lora_param_count(plan.model_shape(llama8b), LoraCfg(r=16)) == 32 * per_layer == 41_943_040


def test_optimizer_state_bytes(tiny, llama8b):
    numels = plan.lora_tensor_numels(plan.model_shape(tiny), LoraCfg(r=8))
    n = sum(numels)
    assert plan.optimizer_state_bytes(numels, "paged_adamw_32bit", 2) == (8 * n, 0)  # all < 1e5: not paged
    assert plan.optimizer_state_bytes(numels, "adamw_torch", 2) == (4 * n, 0)  # bf16 exp_avg + exp_avg_sq
    big = plan.lora_tensor_numels(plan.model_shape(llama8b), LoraCfg(r=16))
    plain, paged = plan.optimizer_state_bytes(big, "paged_adamw_32bit", 2)
    assert plain + paged == 8 * 41_943_040 and paged > 0  # the 229,376-element MLP tensors are paged
    assert sum(plan.optimizer_state_bytes(big, "paged_adamw_8bit", 2)) < (plain + paged) / 3


# ---------------------------------------------------------------- base weights


def test_quantized_linear_bytes_by_hand():
    n = 64 * 64  # 4096 params: 2048 packed bytes, 64 blocks of 64
    assert plan.quantized_linear_bytes(64, 64, "nf4", double_quant=False) == 2048 + 4 * 64 + 64
    assert plan.quantized_linear_bytes(64, 64, "nf4", double_quant=True) == 2048 + 64 + 4 * 1 + 1024 + 4 + 64
    assert plan.quantized_linear_bytes(64, 64, "fp4", double_quant=False) == 2048 + 4 * 64 + 64
    assert plan.quantized_linear_bytes(64, 64, "int8") == n + 4 * 64
    assert plan.quantized_linear_bytes(64, 64, "none") == 2 * n


def test_quant_constant_rates_match_bitsandbytes():
    n = 4096 * 14336
    packed = n // 2
    no_dq = plan.quantized_linear_bytes(4096, 14336, "nf4", double_quant=False) - packed
    dq = plan.quantized_linear_bytes(4096, 14336, "nf4", double_quant=True) - packed
    assert no_dq / n == pytest.approx(0.0625, rel=1e-3)  # fp32 absmax per 64: 0.5 bit/param
    assert dq * 8 / n == pytest.approx(0.127, abs=1e-3)  # 8-bit absmax per 64 + fp32 per 256 blocks


def test_llama_8b_nf4_base_weights(llama8b):
    cfg = make_cfg(quant=QuantCfg(mode="nf4", double_quant=True))
    est = plan.estimate(cfg, llama8b, tokens=2048)
    # as loaded: 6.98e9 linear params at ~0.516 B + 1.05e9 embedding/lm_head/norm params in bf16
    rest = 2 * 128256 * 4096 + 65 * 4096  # embed_tokens, lm_head, 65 RMSNorms: bf16 as loaded
    linear = 8_030_261_248 - rest  # 6.98e9 quantized params: 0.5 B packed + 0.0159 B double-quant constants
    assert est["base_weights"] - 2 * rest == pytest.approx(linear * (0.5 + 0.127 / 8), rel=1e-3)
    assert est["base_weights"] / plan.GB == pytest.approx(5.703, abs=0.001)  # 3.60 GB NF4 + 2.10 GB bf16
    assert est["kbit_upcast"] == 0  # bf16 compute: prepare_for_kbit keeps embeddings/norms/lm_head bf16
    fp16 = plan.estimate(make_cfg(quant=QuantCfg(mode="nf4", compute_dtype="float16")), llama8b, tokens=2048)
    assert fp16["kbit_upcast"] == 2 * rest  # fp16 compute: peft's prepare upcasts fp16 -> fp32


def test_base_weight_ordering(llama8b):
    cfg = make_cfg()
    nf4 = plan.estimate(with_(cfg, "quant", mode="nf4", double_quant=False), llama8b, 2048)
    nf4_dq = plan.estimate(with_(cfg, "quant", mode="nf4", double_quant=True), llama8b, 2048)
    int8 = plan.estimate(with_(cfg, "quant", mode="int8"), llama8b, 2048)
    none = plan.estimate(with_(cfg, "quant", mode="none"), llama8b, 2048)
    assert nf4_dq["base_weights"] < nf4["base_weights"] < int8["base_weights"] < none["base_weights"]
    assert none["base_weights"] == 2 * 8_030_261_248 and none["kbit_upcast"] == 0


# ---------------------------------------------------------------- activations and the total


def test_more_tokens_more_activation_memory(tiny, llama8b):
    for model_config in (tiny, llama8b):
        cfg = make_cfg()
        small, large = plan.estimate(cfg, model_config, 2048), plan.estimate(cfg, model_config, 8192)
        for key in ("activations_saved", "activations_working", "loss_head", "total"):
            assert large[key] > small[key]
        for key in ("base_weights", "lora_params", "optimizer_states"):
            assert large[key] == small[key]


def test_default_tokens_are_batch_times_max_length(tiny):
    cfg = make_cfg()
    assert plan.estimate(cfg, tiny) == plan.estimate(cfg, tiny, tokens=2 * 512)


def test_checkpointing_off_needs_more_activation_memory(tiny, llama8b):
    for model_config in (tiny, llama8b):
        on = plan.estimate(make_cfg(), model_config, 4096)
        off = plan.estimate(with_(make_cfg(), "train", gradient_checkpointing=False), model_config, 4096)
        assert off["activations_saved"] + off["activations_working"] > on["activations_saved"] + on["activations_working"]
        assert off["total"] > on["total"]


def test_peft_dropout_kernel_saves_input_copies(tiny):
    """lora.kernel=peft keeps a bf16 dropout copy + a bool mask of every LoRA input (3 B per in_feature per
    token) until the layer's backward; the fused kernel keeps none. Without dropout both save nothing."""
    peft = with_(make_cfg(), "lora", kernel="peft")
    assert plan.lora_input_copy_bytes(peft.lora, peft.quant) == 3
    assert plan.lora_input_copy_bytes(make_cfg().lora, make_cfg().quant) == 0
    no_drop = with_(peft, "lora", dropout=0.0)
    assert plan.lora_input_copy_bytes(no_drop.lora, no_drop.quant) == 0
    fused, slow = plan.estimate(make_cfg(), tiny, 4096), plan.estimate(peft, tiny, 4096)
    in_features = sum(i for i, _ in TINY_LAYER.values())  # per layer; only one layer's recompute is alive
    grown = slow["activations_working"] - fused["activations_working"]  # less the down_proj copy freed
    assert grown == pytest.approx(3 * (in_features - TINY_LAYER["down_proj"][0]) * 4096, rel=0.01)


def test_checkpointed_activations_by_hand(tiny):
    tokens = 1000
    act = plan.activation_bytes(plan.model_shape(tiny), make_cfg(train=TrainCfg(offload_checkpoints=False)), tokens)
    # resident checkpoints: one bf16 hidden state per layer (bf16 compute: no fp32 upcast) + cos/sin (2 * 16 bf16) + int64 inputs
    assert act["saved"] == tokens * (2 * 2 * 64 + 2 * 16 * 2 + 24)
    per_layer = plan.layer_saved_bytes_per_token(plan.model_shape(tiny), LoraCfg(r=8), QuantCfg())
    assert per_layer["norms"] == 2 * (4 * 64 + 4)  # RMSNorm saves its input upcast to fp32
    assert per_layer["attention"] == 2 * (64 + 2 * 32) + 2 * 64 + 4 * 4
    assert per_layer["mlp"] == 3 * 2 * 128
    fp16 = plan.layer_saved_bytes_per_token(plan.model_shape(tiny), LoraCfg(r=8), QuantCfg(compute_dtype="float16"))
    assert fp16["mlp"] == 3 * 4 * 128  # fp16 compute keeps peft's fp32 upcast: fp32 residual stream
    # LoRA (dropout 0.05, lean dropout): only the bf16 r-vector per branch; x is the base layer's
    assert per_layer["lora"] == sum(2 * 8 for _ in TINY_LAYER.values())
    # DoRA keeps peft's dropout: bf16 output (2) + bool mask (1) per in_feature
    dora = plan.layer_saved_bytes_per_token(plan.model_shape(tiny), LoraCfg(r=8, use_dora=True), QuantCfg())
    assert dora["lora"] == sum(3 * i + 2 * 8 for i, _ in TINY_LAYER.values())
    # fp16 compute without dropout: autocast copies the fp32 input of each branch to fp16 (2 per in_feature)
    fp16_nodrop = plan.layer_saved_bytes_per_token(plan.model_shape(tiny), LoraCfg(r=8, dropout=0.0),
                                                   QuantCfg(compute_dtype="float16"))
    assert fp16_nodrop["lora"] == sum(2 * i + 2 * 8 for i, _ in TINY_LAYER.values())


def test_fused_loss_head_is_far_smaller_than_full_logits(llama8b):
    shape, q, tokens = plan.model_shape(llama8b), QuantCfg(), 16384
    unfused = plan.loss_head_bytes(shape, q, tokens, fused=False)
    h, v = 4096, 128256
    # final norm's fp32 input (4) + its bf16 output (2); logits bf16 + fp32 upcast + fp32 grad; lm_head is
    # already bf16 (no fp32 upcast with bf16 compute), so no autocast copy of it
    assert unfused == tokens * (4 + 2) * h + tokens * v * (2 + 4 + 4)
    assert plan.loss_head_bytes(shape, q, tokens, fused=True) < unfused / 10


def test_total_counts_only_the_larger_working_set(tiny):
    est = plan.estimate(make_cfg(), tiny, 4096)
    parts = sum(est[k] for k in plan.COMPONENTS)
    assert est["total"] == pytest.approx(parts - min(est["activations_working"], est["loss_head"]))
    assert set(est) == set(plan.COMPONENTS) | {"total", "host_offload"}


# ---------------------------------------------------------------- against measured peaks (H100, docs/benchmarks.md)

# The bench workload (scripts/bench.py, docs/benchmarks.md "Workload"): Llama-3.1-8B, NF4 + double quant, bf16
# compute, LoRA r16 alpha 32 dropout 0.05 on all linear layers, paged_adamw_32bit, gradient checkpointing,
# 16 rows per padding-free micro-batch of lognormal lengths (mean 400, capped at data.max_length 2048).
# Measured: torch.cuda.max_memory_allocated over 10 steps (2 warm-up + 8 timed), whose largest micro-batch was
# step 3's 9,538 tokens: 10.71 GB with lora.kernel=fused (runs 7-9, 13, 14: 10.7096 GB every
# time, docs/results/bench-h100-run14.json), 10.42 GB with fused_triton, the default (runs 9, 10, 14, and session 8
# with LoRA groups and the one-step AdamW: 10.4163 GB).
WORKLOAD_TOKENS = 9538
MEASURED_WORKLOAD_GB = {"fused": 10.7096, "fused_triton": 10.4163}  # checkpoints resident (offload off)
# --plan-check (run 10, lora.kernel=fused_triton, then the default): B rows of exactly L tokens per micro-batch
MEASURED_FIXED_GB = {2048: 7.0396, 8192: 9.8010, 16384: 13.6002}
# session 9 (201ebc5, H100, three runs each, the lazy mask's 91 MB gone): offload off and on, as the default has it now
MEASURED_WORKLOAD_NOW_GB = {False: 10.3254, "auto": 8.1382}


def workload_cfg(kernel: str = "fused_triton", offload=False) -> Config:
    """The bench's config for way c (scripts/bench.py write_our_config): everything else is a default, but the checkpoint
    offload, off as it was when most of these peaks were measured (the default, auto, is on for any GPU run now)."""
    return make_cfg(model=ModelCfg(name_or_path="meta-llama/Llama-3.1-8B"),
                    data=DataCfg(train="train.jsonl", format="text", max_length=2048),
                    train=TrainCfg(offload_checkpoints=offload),
                    lora=LoraCfg(r=16, alpha=32, target_modules="all-linear", kernel=kernel))


@pytest.mark.parametrize("kernel", ["fused", "fused_triton"])
def test_workload_peak_matches_measured(kernel):
    """The plan of the 8B bench workload, its model from the known-bases table (offline), at the largest
    micro-batch the run made, against the measured peak: within 10 % (the bar), and on the safe side."""
    cfg = workload_cfg(kernel)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.packing) == (16, 1, "padding_free")
    est = plan.estimate(cfg, plan.plan_model_config(cfg.model), tokens=WORKLOAD_TOKENS)
    measured = MEASURED_WORKLOAD_GB[kernel]
    err = (plan.torch_allocated(est) / plan.GB - measured) / measured
    assert abs(err) <= 0.10
    assert 0 <= err <= 0.05  # measured: +1.6 % (fused), +4.5 % (fused_triton)


@pytest.mark.parametrize("offload", sorted(MEASURED_WORKLOAD_NOW_GB, key=str))
def test_workload_peak_now_matches_measured(offload):
    """The same workload as today's code runs it, resident and offloaded (the default): within the issue's 10 % and on the
    safe side. The plan does not model the dense attention mask the lazy mask stopped building, so both predictions
    stayed where they were and are +5.4 % (resident) and +5.9 % (offloaded) high now."""
    est = plan.estimate(workload_cfg(offload=offload), plan.known_base("meta-llama/Llama-3.1-8B"), tokens=WORKLOAD_TOKENS)
    measured = MEASURED_WORKLOAD_NOW_GB[offload]
    err = (plan.torch_allocated(est) / plan.GB - measured) / measured
    assert 0 <= err <= 0.10
    assert (est["host_offload"] > 0) == (offload == "auto")


@pytest.mark.parametrize("tokens", sorted(MEASURED_FIXED_GB))
def test_fixed_micro_batch_peaks_match_measured(tokens):
    """2k / 8k / 16k-token micro-batches (4 x 512, 16 x 512, 16 x 1024 rows): measured +1.8 / +4.2 / +5.0 %."""
    cfg = workload_cfg("fused_triton")
    est = plan.estimate(cfg, plan.known_base("meta-llama/Llama-3.1-8B"), tokens=tokens)
    err = (plan.torch_allocated(est) / plan.GB - MEASURED_FIXED_GB[tokens]) / MEASURED_FIXED_GB[tokens]
    assert 0 <= err <= 0.06


# Issue #21 (H200, --plan-check --plan-tokens 1x65536,1x131072, before offload and tiling existed): one row
MEASURED_LONG_GB = {65536: 37.6, 131072: 69.2}


def long_row_cfg(tokens: int, offload, tile) -> Config:
    cfg = with_(workload_cfg(), "data", max_length=tokens)
    return with_(cfg, "train", batch_size=1, offload_checkpoints=offload, tile_mlp=tile)


@pytest.mark.parametrize("tokens", sorted(MEASURED_LONG_GB))
def test_long_row_peaks_match_measured_without_offload_and_tiling(tokens):
    est = plan.estimate(long_row_cfg(tokens, False, False), plan.known_base("meta-llama/Llama-3.1-8B"))
    err = (plan.torch_allocated(est) / plan.GB - MEASURED_LONG_GB[tokens]) / MEASURED_LONG_GB[tokens]
    assert 0 <= err <= 0.05 and est["host_offload"] == 0


def test_offload_and_tiling_in_the_plan():
    """At 131K on the 8B: offload keeps 2 of 32 layer inputs and the embedding output on the GPU and puts 31 (all but
    the last layer's) in pinned RAM; tiling counts the MLP's tensors for one 16K chunk and keeps the chunk inputs
    (R * hidden per token) instead, which leaves the attention backward as the working set's peak."""
    from train.kernels import tiled_mlp

    model, n = plan.known_base("meta-llama/Llama-3.1-8B"), 131072
    plain = plan.estimate(long_row_cfg(n, False, False), model)
    off = plan.estimate(long_row_cfg(n, True, False), model)
    tiled = plan.estimate(long_row_cfg(n, False, True), model)
    hidden = 2 * 4096  # bf16 residual
    assert plain["activations_saved"] - off["activations_saved"] == n * 29 * hidden
    assert off["host_offload"] == n * 31 * hidden and off["activations_working"] == plain["activations_working"]
    mlp = (3 + 3) * 2 * 14336  # saved SiLU input/output and up + 3 gradients, bf16, per token
    dequant = plan.dequant_workspace_bytes(plan.model_shape(model), long_row_cfg(n, False, True).quant)
    tiled_mlp_peak = plain["activations_working"] - dequant - (n - tiled_mlp.TILE_TOKENS) * mlp + n * hidden
    attention_peak = n * plan.attention_backward_bytes_per_token(plan.model_shape(model), long_row_cfg(n, 0, 0).quant)
    assert tiled["activations_working"] == max(attention_peak, tiled_mlp_peak) + dequant
    auto = plan.estimate(long_row_cfg(n, "auto", "auto"), model)
    assert auto["total"] == pytest.approx(plain["total"] - (plain["activations_saved"] - off["activations_saved"])
                                          - (plain["activations_working"] - tiled["activations_working"]))
    assert plan.torch_allocated(auto) / plan.GB < 0.5 * plan.torch_allocated(plain) / plan.GB


# One row on an H100 with offload and tiling as set (docs/benchmarks.md "Long rows"). Session 4 (2026-12-07):
# every layer ran FlashAttention 2 varlen's backward; session 5 (2026-12-07): one row of >= 4,096 (16,384 for
# the 131K row) ran cuDNN's, whose workspace turned out as large as FA2's buffers
MEASURED_LONG_FA2_GB = {(131072, "auto", "auto"): 23.255, (350000, "auto", "auto"): 53.61,
                        (131072, "auto", False): 38.004, (131072, False, "auto"): 54.315}
MEASURED_LONG_CUDNN_GB = {4096: 7.994, 16384: 10.106, 131072: 23.236, 350000: 52.130}


@pytest.mark.parametrize("tokens, offload, tile", sorted(MEASURED_LONG_FA2_GB, key=str))
def test_long_row_peaks_with_offload_and_tiling_match_measured(tokens, offload, tile):
    """Within 10 %: +0.8 / -2.4 / +5.5 / +0.5 %. Before the attention backward had its own term, tiled rows
    were planned 12.5 % (131K) and 26.5 % (350K) low."""
    est = plan.estimate(long_row_cfg(tokens, offload, tile), plan.known_base("meta-llama/Llama-3.1-8B"))
    measured = MEASURED_LONG_FA2_GB[tokens, offload, tile]
    assert abs(plan.torch_allocated(est) / plan.GB - measured) / measured <= 0.10


@pytest.mark.parametrize("tokens", sorted(MEASURED_LONG_CUDNN_GB))
def test_one_row_through_cudnn_matches_measured(tokens):
    """cuDNN's backward workspace (8 * q_dim + 4 * heads bytes a token) is what FA2's fp32 dq and per-query-head
    dk/dv were: one formula plans both, +2.3 / +2.8 / +0.8 / +0.3 %. Planning cuDNN 4 * q_dim bytes a token
    smaller (session 4's guess) missed the 350K row by -10.7 %."""
    offload = "auto" if tokens >= 16384 else False  # as measured: auto offloaded from 16,384 tokens then
    est = plan.estimate(long_row_cfg(tokens, offload, "auto"), plan.known_base("meta-llama/Llama-3.1-8B"))
    measured = MEASURED_LONG_CUDNN_GB[tokens]
    assert abs(plan.torch_allocated(est) / plan.GB - measured) / measured <= 0.05


def test_a_350k_row_fits_80_gb_only_with_offload_and_tiling(capsys, tmp_path):
    model = plan.known_base("meta-llama/Llama-3.1-8B")
    assert plan.estimate(long_row_cfg(350_000, "auto", "auto"), model)["total"] / plan.GB < 80
    assert plan.estimate(long_row_cfg(350_000, False, False), model)["total"] / plan.GB > 80
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  name_or_path: meta-llama/Llama-3.1-8B\ndata:\n  train: t.jsonl\n  max_length: 350000\n"
                    "train:\n  batch_size: 1\n", encoding="utf-8")
    assert plan.plan_main(str(path), [], 80) == 0
    out = capsys.readouterr().out
    assert "inputs offloaded to CPU; MLP in 16,384-token chunks" in out and "pinned CPU RAM" in out
    assert "fits on a 80 GB GPU: yes" in out


def test_torch_allocated_excludes_paged_states_and_context():
    est = plan.estimate(workload_cfg(), plan.known_base("meta-llama/Llama-3.1-8B"), tokens=WORKLOAD_TOKENS)
    assert est["optimizer_states_paged"] > 0  # the 229,376-element MLP LoRA tensors are paged
    assert plan.torch_allocated(est) == est["total"] - est["optimizer_states_paged"] - plan.CUDA_OVERHEAD_BYTES


def test_bad_tokens_is_a_user_error(tiny):
    with pytest.raises(UserError, match="tokens"):
        plan.estimate(make_cfg(), tiny, tokens=0)


# ---------------------------------------------------------------- model sources without the hub

# Parameter counts the model cards publish (the planner builds each known base on the meta device)
KNOWN_PARAMS = {"meta-llama/Llama-3.1-8B": 8_030_261_248, "Qwen/Qwen2.5-7B": 7_615_616_512,
                "mistralai/Mistral-7B-v0.3": 7_248_023_552, "google/gemma-2-9b": 9_241_705_984,
                "HuggingFaceTB/SmolLM2-135M": 134_515_008, "Qwen/Qwen3-8B": 8_190_735_360,
                "google/gemma-3-1b-pt": 999_885_952, "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552}


@pytest.mark.parametrize("name", sorted({*plan.KNOWN_BASES, *plan.KNOWN_VARIANTS}))
def test_known_bases_build_offline_with_published_sizes(name):
    shape = plan.model_shape(plan.known_base(name))
    assert sum(shape.params.values()) == KNOWN_PARAMS[plan.KNOWN_VARIANTS.get(name, name)]
    assert plan.known_base(name.lower()) is not None  # hub ids are case-insensitive


def test_known_base_shapes():
    gemma = plan.model_shape(plan.known_base("google/gemma-2-9b-it"))
    assert (gemma.head_dim, gemma.q_dim, gemma.kv_dim, gemma.n_layers) == (256, 4096, 2048, 42)
    assert gemma.params["lm_head"] == 0  # tied: counted once, under embedding
    qwen = plan.model_shape(plan.known_base("Qwen/Qwen2.5-7B-Instruct"))
    assert qwen.params["linear_bias"] == 28 * (3584 + 2 * 512)  # q/k/v biases
    smol = plan.model_shape(plan.known_base("HuggingFaceTB/SmolLM2-135M"))
    assert (smol.hidden, smol.n_heads, smol.n_kv_heads, smol.head_dim, smol.vocab) == (576, 9, 3, 64, 49152)


def test_known_family_shapes_gemma3_vocab_qwen3_norms_phi3_fused():
    """Gemma 3's 262,144-token vocabulary tied to its embeddings: one bf16 matrix, never quantized, and the fused
    loss head's fixed tiles instead of full logits; Qwen3's q/k norms; Phi-3's fused qkv_proj and gate_up_proj."""
    g3 = plan.model_shape(plan.known_base("google/gemma-3-1b-it"))
    assert (g3.arch, g3.vocab, g3.head_dim, g3.lm_head) == ("Gemma3ForCausalLM", 262144, 256, "lm_head")
    assert g3.params["lm_head"] == 0 and g3.params["embedding"] == 262144 * 1152  # tied: counted once
    assert all(l.name != "lm_head" for l in g3.quantized_linears())
    quant = QuantCfg()
    assert plan.base_weight_bytes(g3, quant)["other"] >= 2 * 262144 * 1152  # the tied matrix, in bf16, once
    tokens = 16 * 1024
    fused, full = plan.loss_head_bytes(g3, quant, tokens), plan.loss_head_bytes(g3, quant, tokens, fused=False)
    assert full > 20 * fused  # full logits: 16k x 262k x 10 B = 43 GB; the fused head: under 1 GB
    q3 = plan.model_shape(plan.known_base("Qwen/Qwen3-8B-Base"))
    assert q3.params["norm"] == 36 * (2 * 4096 + 2 * 128) + 4096  # 2 RMSNorms + q_norm, k_norm per layer
    phi = plan.model_shape(plan.known_base("microsoft/Phi-3-mini-4k-instruct"))
    assert {l.name.rsplit(".", 1)[-1] for l in phi.linears} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                               "lm_head"}
    fused_shapes = {l.name.rsplit(".", 1)[-1]: (l.in_features, l.out_features) for l in phi.linears
                    if ".layers.0." in l.name}
    assert fused_shapes["qkv_proj"] == (3072, 3 * 3072) and fused_shapes["gate_up_proj"] == (3072, 2 * 8192)
    lora = LoraCfg(r=16, target_modules=["qkv_proj", "gate_up_proj"])
    assert plan.lora_param_count(phi, lora) == 32 * 16 * ((3072 + 9216) + (3072 + 16384))
    with pytest.raises(UserError, match=r"\['q_proj'\] not found .*'qkv_proj'"):
        plan.lora_targets(phi, ["q_proj"])


@pytest.mark.parametrize("targets, ok", [(["mlp.down_proj"], True), (["self_attn.q_proj", "up_proj"], True),
                                         (["q_proj", "nope_proj"], False), ([".*_proj"], False)])
def test_plan_and_fit_agree_on_targets(tiny, targets, ok):
    """plan.lora_targets and the fit's lora.check_targets take and refuse the same list (one shared rule)."""
    from train import lora
    from train.model import meta_model

    shape, cfg = plan.model_shape(tiny), LoraCfg(r=8, target_modules=targets)
    if ok:
        lora.check_targets(meta_model(tiny), cfg)
        leaves = {t.rsplit(".", 1)[-1] for t in targets}
        assert {l.name.rsplit(".", 1)[-1] for l in plan.lora_targets(shape, targets)} == leaves
        return
    for call in (lambda: lora.check_targets(meta_model(tiny), cfg), lambda: plan.lora_targets(shape, targets)):
        with pytest.raises(UserError, match=r"lora.target_modules: \[.*\] not found in the model"):
            call()


def test_plan_reads_a_name_as_the_fit_does(tmp_path, monkeypatch):
    """A local-looking path without config.json: the same one-line error from train plan and from the fit."""
    from train import model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name" / "x").mkdir(parents=True)
    for call in (plan.plan_model_config, model.resolve_model_path):
        with pytest.raises(UserError, match="org/name/x is not a model directory"):
            call(ModelCfg(name_or_path="org/name/x"))


@pytest.mark.parametrize("name, arch", [("Qwen/Qwen3-8B", "Qwen3ForCausalLM"),
                                        ("google/gemma-3-1b-it", "Gemma3ForCausalLM"),
                                        ("microsoft/Phi-3-mini-4k-instruct", "Phi3ForCausalLM")])
def test_plan_main_new_families_offline(name, arch, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  name_or_path: {name}\ndata:\n  train: train.jsonl\n  max_length: 1024\n",
                    encoding="utf-8")
    assert plan.plan_main(str(path), [], 24) == 0
    out = capsys.readouterr().out
    assert f"({arch}, " in out and "fits on a 24 GB GPU" in out


def test_local_folder_and_config_json(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "m")
    for name in (tmp_path / "m", tmp_path / "m" / "config.json"):
        got = plan.plan_model_config(ModelCfg(name_or_path=str(name)))
        assert plan.count_params_by_type(got) == plan.count_params_by_type(tiny)


def test_local_folder_wins_over_the_known_table(tmp_path, monkeypatch, tiny):
    """A folder whose relative path equals a known id is the user's model, not the table's."""
    tiny.save_pretrained(tmp_path / "meta-llama" / "Llama-3.1-8B")
    monkeypatch.chdir(tmp_path)
    got = plan.plan_model_config(ModelCfg(name_or_path="meta-llama/Llama-3.1-8B"))
    assert got.hidden_size == 64


def test_gguf_metadata_only(tmp_path):
    """A .gguf is read for its metadata: no tensor needed, nothing converted."""
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(256)
    w.add_tokenizer_model("gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = plan.plan_model_config(ModelCfg(name_or_path=str(path)))
    want = LlamaConfig(**{**TINY, "tie_word_embeddings": True})  # no output.weight: tied
    assert plan.count_params_by_type(got) == plan.count_params_by_type(want)
    with pytest.raises(UserError, match="no such file"):
        plan.plan_model_config(ModelCfg(name_or_path=str(tmp_path / "missing.gguf")))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="cannot read the architecture"):
        plan.plan_model_config(ModelCfg(name_or_path=str(tmp_path / "bad.gguf")))


def test_unknown_id_offline_names_the_fix():
    with pytest.raises(UserError, match="offline.*pass a local model folder or its config.json"):
        plan.plan_model_config(ModelCfg(name_or_path="nobody/not-a-known-base-7b"))


def test_plan_main_known_base_offline(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  name_or_path: meta-llama/Llama-3.1-8B-Instruct\n"
                    "data:\n  train: train.jsonl\n  max_length: 2048\n", encoding="utf-8")
    assert plan.plan_main(str(path), [], 80, tokens=WORKLOAD_TOKENS) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM, 8,030,261,248 params" in out and "9,538 tokens (override)" in out


# ---------------------------------------------------------------- plan_main


@pytest.fixture
def config_file(tmp_path):
    model_dir = tmp_path / "tiny-model"
    LlamaConfig(**TINY).save_pretrained(model_dir)  # config.json only: no weights needed
    path = tmp_path / "config.yaml"
    path.write_text(
        f"model:\n  name_or_path: {model_dir}\n"
        "data:\n  train: train.jsonl\n  max_length: 256\n"
        "train:\n  batch_size: 2\n"
        "lora:\n  r: 8\n",
        encoding="utf-8",
    )
    return path


def test_plan_main_prints_table(config_file, capsys):
    assert plan.plan_main(str(config_file), [], 80) == 0
    out = capsys.readouterr().out
    for label in ("base weights as loaded", "LoRA params", "optimizer states", "activations kept across the step",
                  "loss head", "CUDA context", "total (predicted peak)"):
        assert label in out
    assert "512 tokens (2 x 256" in out
    assert "fits on a 80 GB GPU: yes (headroom" in out


def test_plan_main_overrides_tokens_and_small_gpu(config_file, capsys):
    assert plan.plan_main(str(config_file), ["train.gradient_checkpointing=false"], 0.001, tokens=16384) == 0
    out = capsys.readouterr().out
    assert "16,384 tokens (override)" in out and "gradient checkpointing off" in out
    assert "fits on a 0.001 GB GPU: no" in out


def test_plan_main_default_gpu(config_file, capsys):
    assert plan.plan_main(str(config_file), [], None) == 0
    assert f"fits on a {plan.DEFAULT_GPU_GB:g} GB GPU" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "gpu_gb", "match"),
    [
        ([], 0, "gpu-gb"),
        (["train.batch_size=0"], 80, "batch_size"),
        (["lora.target_modules=[nope]"], 80, "not found"),
        (["model.name_or_path=./missing-model-dir"], 80, "no config.json"),
        (["model.name_or_path=nobody/unknown-model"], 80, "pass a local model folder"),
    ],
)
def test_plan_main_user_errors(config_file, overrides, gpu_gb, match):
    with pytest.raises(UserError, match=match):
        plan.plan_main(str(config_file), overrides, gpu_gb)


def test_plan_main_missing_config(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plan.plan_main(str(tmp_path / "nope.yaml"), [], 80)


def test_cli_tokens_sets_the_micro_batch_planned(capsys):
    """`train plan --tokens N` plans N tokens per micro-batch (offline, known base): more tokens, a higher peak."""
    from conftest import REPO
    from train.cli import main

    def total(extra):
        assert main(["plan", str(REPO / "configs/llama-3.1-8b-pricer.yaml"), *extra]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("total (predicted peak)"))
        return float(line.split()[-1])

    small, large = total(["--tokens", "2048"]), total(["--tokens", "16384"])
    assert small < large


def test_plan_prints_the_pinned_ram_offload_reserves():
    """Offload pins slabs for its largest micro-batch before the first copy (kernels/offload.py): at one 350,000-token
    row of the 8B, 31 inputs (all but the last layer's) of 2.87 GB in power-of-two slabs of 64 + 16 + 8 + 4 GiB."""
    est = plan.estimate(long_row_cfg(350000, True, True), plan.known_base("meta-llama/Llama-3.1-8B"))
    assert est["host_offload"] == 92 * 2**30
    small = plan.estimate(long_row_cfg(350000, True, True), plan.known_base("meta-llama/Llama-3.1-8B"), tokens=1000)
    assert small["host_offload"] == est["host_offload"]  # pinned for the largest micro-batch, whatever this one is
