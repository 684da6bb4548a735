"""Memory planner: predict the peak GPU memory of one QLoRA training step before any weight loads.

`python -m train plan CONFIG [--set k=v] [--gpu-gb 80]` reads only the model's architecture, builds it
on the meta device (no memory) to count parameters exactly per module, and prints a table of the
components below, the predicted peak and whether it fits a GPU of the given size. No weights are read
and, for the bases in KNOWN_BASES, no network either; model.name_or_path resolves in this order
(train/plan_shape.py plan_model_config, which reads the name as train/model.py does):

1. a local model folder, its config.json, or a .gguf file (architecture from the GGUF metadata);
2. a known base (KNOWN_BASES: Llama-3.1-8B, Qwen2.5-7B, Qwen3-8B, Mistral-7B-v0.3, gemma-2-9b, gemma-3-1b,
   Phi-3-mini-4k-instruct, SmolLM2-135M and their instruct or base variants), from the table below;
3. the hub's config.json; offline, an unknown id is a one-line UserError naming the fix.

What the prediction models (the pipeline in train/model.py, train/lora.py, train/trainer.py):

* base weights as loaded: every nn.Linear except lm_head quantized by bitsandbytes (exact bnb
  storage, quantization constants included); everything else (embeddings, lm_head, norms, biases)
  in quant.compute_dtype.
* k-bit prep (train/model.py prepare_for_kbit): with bf16 compute (the default) nothing is upcast: the
  embeddings, norms and lm_head stay bf16, and so does the residual stream. Only with fp16/fp32 compute
  does it call peft's prepare_model_for_kbit_training, which upcasts every non-quantized parameter to
  fp32 (+2 bytes per such parameter: the kbit_upcast row) and so makes the embedding output, the
  residual stream, the RMSNorm outputs and the q/k/v/gate/up matmul outputs fp32 (bitsandbytes returns
  the input dtype): Precision.residual = 4 instead of 2.
* LoRA A/B on the targeted Linear layers: r*(in+out) each. TRL's SFTTrainer casts trainable
  parameters of a quantized model to bf16 (2 B); grads share the parameter dtype; optimizer states
  per train.optimizer.
* activations of one micro-batch of `tokens` tokens (batch_size * data.max_length unless overridden:
  the worst case, every row at full length). Padding-free batches of shorter rows use fewer tokens:
  pass the largest micro-batch a dataset really makes as `tokens` to compare with a measured peak.
* the loss head: TRL >= 1.16 SFTTrainer patches the model with a fused, chunked lm_head + log-softmax
  (trl.trainer.utils.add_fused_lm_head) that never materializes [tokens, vocab] logits. The full-logits
  formula of plain transformers (bf16 logits + fp32 upcast + fp32 gradient) is kept behind
  `fused_lm_head=False` for other trainers.
* long rows (train.offload_checkpoints, train.tile_mlp; train/kernels/long_rows.py decides with the same rule):
  offloaded checkpoints keep 2 layer inputs on the GPU (pinned CPU RAM is printed apart, outside the total);
  a tiled MLP holds its tensors and gradients for one TILE_TOKENS chunk.
* a fixed CUDA context / allocator overhead.

Peak = every persistent term + saved activations + the larger of two working sets that are never live
at the same time: one decoder layer's recompute + backward, and the loss head's backward.

Units: bytes everywhere inside; GB = 1e9 bytes in the table (what model.get_memory_footprint()/1e9
reports in train/model.py). Every constant below is a module-level name so measured peaks
(torch.cuda.max_memory_allocated: compare with torch_allocated()) can calibrate it. Checked against the
H100 measurements of docs/benchmarks.md in tests/test_plan.py: Llama-3.1-8B, NF4 + double quant, LoRA r16
all-linear, padding-free 16-row micro-batches: 10.71 GB measured at 9,538 tokens, and 2k/8k/16k-token
micro-batches within +2..+5 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.config import Config, LoraCfg, QuantCfg, target_matches
from train.errors import UserError
from train.plan_shape import (KNOWN_BASES, KNOWN_VARIANTS, LinearInfo, ModelShape, count_params_by_type,  # noqa: F401
                              gguf_config, known_base, model_shape, plan_model_config)

GB = 1e9  # table unit: decimal GB, as in train/model.py's footprint report

# --------------------------------------------------------------------------------------------
# Calibration constants. Each is one named value so a measured peak can correct it.

# Quantized base weights: what bitsandbytes allocates (bitsandbytes/functional.py quantize_4bit)
NF4_BLOCKSIZE = 64  # 4-bit blocksize transformers uses (BitsAndBytesConfig exposes no other): one absmax per 64
ABSMAX_BYTES = 4  # fp32 absmax per 4-bit block without double quant: 4/64 = 0.0625 B/param (0.5 bit)
DQ_ABSMAX_BYTES = 1  # double quant: the per-64 absmax is stored as uint8 ...
DQ_BLOCKSIZE = 256  # ... quantized blockwise in blocks of 256 absmax values ...
DQ_ABSMAX2_BYTES = 4  # ... with one fp32 absmax per 256 blocks: 1/64 + 4/16384 B/param = 0.127 bit/param
DQ_CODE_BYTES = 256 * 4  # ... a per-layer fp32 copy of the 8-bit dynamic map (state2.code) ...
DQ_OFFSET_BYTES = 4  # ... and the fp32 mean subtracted before the second quantization (offset)
FOUR_BIT_CODE_BYTES = 16 * 4  # per-layer fp32 NF4/FP4 code table (QuantState.code)
INT8_SCB_BYTES = 4  # LLM.int8: int8 weight (1 B/param) + one fp32 scale per output row (SCB)
FP32_BYTES = 4  # fp32; peft's prepare_model_for_kbit_training (fp16/fp32 compute only) upcasts to it

# Trainable parameters and optimizer
LORA_KBIT_PARAM_BYTES = 2  # TRL SFTTrainer casts LoRA params of a quantized model to bf16
LORA_FULL_PARAM_BYTES = 4  # quant.mode=none: peft keeps adapters fp32 (autocast_adapter_dtype=True) ...
LORA_AUTOCAST_COPY_BYTES = 2  # ... and autocast keeps a bf16 copy of each for the backward
DORA_MAGNITUDE_BYTES = 4  # DoRA magnitude vectors: TRL leaves them fp32
ADAM_32BIT_STATE_BYTES = 8  # bitsandbytes 32-bit Adam: two fp32 states per param, whatever the param dtype
ADAM_8BIT_STATE_BYTES = 2  # bitsandbytes 8-bit Adam: two uint8 states per param ...
ADAM_8BIT_BLOCKSIZE = 256  # ... plus two fp32 absmax per 256-element block ...
ADAM_8BIT_MIN_SIZE = 4096  # ... for tensors of >= 4096 elements; smaller ones get 32-bit states
PAGED_MIN_NUMEL = 100_000  # bnb pages (cudaMallocManaged) only state tensors of >= 1e5 elements:
# these do not show in torch.cuda.max_memory_allocated, but do occupy the GPU unless evicted
TORCH_ADAM_STATES = 2  # adamw_torch: exp_avg and exp_avg_sq in the param dtype (bf16 for QLoRA)

# Activations, per token, per decoder layer (Llama-family block: RMSNorm, GQA sdpa, SwiGLU MLP)
NORMS_PER_LAYER = 2  # input_layernorm + post_attention_layernorm
NORM_SAVED_BYTES = 4  # RMSNorm computes in fp32 and saves that fp32 input (fp32 residual: the residual itself)
NORM_STAT_BYTES = 4  # ... plus one fp32 rsqrt(mean(x^2)) per token
ATTN_QKV_BYTES = 2  # sdpa (flash, causal) saves q, k, v in the autocast dtype ...
ATTN_OUT_BYTES = 2  # ... its output ...
ATTN_LSE_BYTES = 4  # ... and an fp32 logsumexp per head
MLP_SAVED_TENSORS = 3  # SiLU input (gate), SiLU output, up: each `intermediate` wide
LORA_INPUT_BYTES = 2  # lora_A saves its bf16 (autocast) input for the weight gradient: per in_feature
LORA_DROPOUT_MASK_BYTES = 1  # CUDA fused dropout saves a bool mask per in_feature (none when dropout == 0)
LORA_MID_BYTES = 2  # lora_B saves lora_A's bf16 output: r values
INT8_SAVED_INPUTS = True  # LLM.int8 matmul saves its input (attn/mlp norm outputs, attn output, down input)
ROPE_TENSORS = 2  # cos and sin: head_dim values per token each, in the residual dtype; shared by all layers
INPUT_BYTES_PER_TOKEN = 3 * 8  # input_ids, attention_mask, labels: int64
OFFLOAD_GPU_LAYERS = 2  # offloaded checkpoints: the input being recomputed + the next one, prefetched ...
OFFLOAD_KEPT_HIDDEN = 1  # ... + the embedding output, live on the GPU all step (memory_peak at 131K, H100)

# Backward of one layer (on top of its saved tensors)
BWD_MLP_GRAD_TENSORS = 3  # d(act*up), d(SiLU) and d(up) live together in the MLP backward
BWD_RESIDUAL_GRAD_TENSORS = 1  # gradient of the layer output, held for the residual sum
BWD_NONE_LORA_GRAD_BYTES = 4  # quant.mode=none: peft casts LoRA inputs to the fp32 adapter dtype, so the
# down projection's input gradient also passes through an fp32 copy (4 * intermediate)
# Backward of one layer's attention: the peak once the MLP is tiled (memory_peak of one 131K row, H100; the
# blocks live there are docs/benchmarks.md's "What is live at the peak"). Both kernels we run need the same:
ATTN_BWD_FP32_WORKSPACE = 2  # FA2: fp32 dq accumulator + dk/dv per query head before the GQA sum (2 + 2 bytes);
# cuDNN (one long row): an fp32 workspace of 2 query-sized tensors. Either way 2 * 4 bytes per query dim ...
ATTN_GRAD_BYTES = 2  # ... and dq, dk, dv returned in bf16 ...
ATTN_SOFTMAX_D_BYTES = 4  # ... with an fp32 rowsum(dO * O) per head
ATTN_BWD_HIDDEN_TENSORS = 4  # live beside them: the input norm's output (q/k/v's saved input), dO, the
# recomputed layer's output and the gradient of the residual branch, each one hidden-size row per token ...
ATTN_BWD_RESIDUAL_GRADS = 1  # ... + the gradient of the layer output, held for the residual sum
DEQUANT_BYTES = 2  # bnb dequantizes one 4-bit weight to bf16 per matmul (largest Linear counts) ...
DEQUANT_INT8_BYTES = 4  # ... int8's backward dequantizes CB to its (fp32, after the upcast) input dtype

# Loss head
FUSED_LM_HEAD = True  # TRL >= 1.16 SFTTrainer always patches a chunked lm_head: no [tokens, vocab] logits
FUSED_TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
FUSED_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
FUSED_TILE_BYTES = 2  # the [token tile, vocab tile] logits buffer is in the autocast dtype
FUSED_STATS_BYTES = 12 * 4  # fp32 per-token accumulators and outputs (running max, sum exp, log_z, ...)
HEAD_GRAD_HIDDEN_COPIES = 1  # fp32 [tokens, hidden] gradient(s) the head's backward keeps at its peak
LOGITS_BYTES = 2  # unfused: bf16 logits from lm_head under autocast ...
LOGITS_FP32_BYTES = 4  # ... upcast to fp32 by transformers' ForCausalLMLoss (logits.float()) ...
LOGITS_GRAD_BYTES = 4  # ... and the fp32 gradient of that upcast in the backward

# Fixed
CUDA_OVERHEAD_BYTES = 0.5e9  # CUDA context + cuBLAS workspaces + allocator slack: ~0.5 GB on an H100
# (the context is outside torch.cuda.max_memory_allocated; nvidia-smi includes it)
DEFAULT_GPU_GB = 80.0  # an H100 80GB when --gpu-gb is not given

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "auto": 2}  # auto is bf16 on a GPU

COMPONENTS = {  # estimate() keys, in table order, with their labels
    "base_weights": "base weights as loaded",
    "kbit_upcast": "fp32 upcast of the rest (prepare_model_for_kbit_training)",
    "lora_params": "LoRA params",
    "lora_grads": "LoRA grads",
    "optimizer_states": "optimizer states",
    "optimizer_states_paged": "optimizer states, paged (managed memory)",
    "activations_saved": "activations kept across the step",
    "activations_working": "working set: one layer's recompute + backward",
    "loss_head": "working set: loss head",
    "cuda_overhead": "CUDA context + allocator overhead",
}


# --------------------------------------------------------------------------------------------
# Base weights


def quantized_linear_bytes(in_features: int, out_features: int, mode: str, double_quant: bool = True,
                           storage_bytes: int = 1) -> int:
    """Bytes bitsandbytes stores for one quantized Linear weight of n = in*out params (bias excluded).

    4-bit (nf4/fp4), as bitsandbytes.functional.quantize_4bit allocates it:
        packed = floor((n + 1) / (2 * s)) * s          (two 4-bit codes per byte; s = quant_storage bytes)
        blocks = ceil(n / 64)
        no double quant:  absmax = 4 * blocks          (fp32 per 64 params: 0.0625 B/param)
        double quant:     absmax = 1 * blocks + 4 * ceil(blocks / 256) + 1024 (code) + 4 (offset)
                                                       (~0.0159 B/param = 0.127 bit/param)
        + 64 (the 16-entry fp32 NF4/FP4 code table)
    int8 (LLM.int8): n + 4 * out_features               (int8 weight + fp32 row scales SCB)
    none: 2 * n                                          (bf16)
    """
    n = in_features * out_features
    if mode == "none":
        return 2 * n
    if mode == "int8":
        return n + INT8_SCB_BYTES * out_features
    packed = (n + 1) // (2 * storage_bytes) * storage_bytes
    blocks = -(-n // NF4_BLOCKSIZE)
    if double_quant:
        consts = (DQ_ABSMAX_BYTES * blocks + DQ_ABSMAX2_BYTES * -(-blocks // DQ_BLOCKSIZE)
                  + DQ_CODE_BYTES + DQ_OFFSET_BYTES)
    else:
        consts = ABSMAX_BYTES * blocks
    return packed + consts + FOUR_BIT_CODE_BYTES


def base_weight_bytes(shape: ModelShape, quant: QuantCfg) -> dict[str, int]:
    """Base model bytes: {"quantized", "other", "upcast"}.

    quantized = sum over Linear layers except lm_head of quantized_linear_bytes(...)
    other     = (all params - quantized weights) * bytes(compute_dtype)   (embeddings, lm_head, norms, biases
                as loaded; with quant.mode=none every weight is here at 2 B)
    upcast    = (all params - quantized weights) * (4 - bytes(compute_dtype)) when quantized with fp16
                compute: the extra that peft's prepare_model_for_kbit_training adds by casting them to fp32;
                0 with bf16 compute (prepare_for_kbit keeps them bf16) and for quant.mode=none
    """
    compute = DTYPE_BYTES[quant.compute_dtype]
    storage = DTYPE_BYTES[quant.storage_dtype or "uint8"]
    total = sum(shape.params.values())
    if quant.mode == "none":
        return {"quantized": 0, "other": total * compute, "upcast": 0}
    q_layers = shape.quantized_linears()
    quantized = sum(quantized_linear_bytes(l.in_features, l.out_features, quant.mode, quant.double_quant, storage)
                    for l in q_layers)
    rest = total - sum(l.in_features * l.out_features for l in q_layers)
    upcast = rest * max(0, FP32_BYTES - compute) if upcasts(quant) else 0
    return {"quantized": quantized, "other": rest * compute, "upcast": upcast}


# --------------------------------------------------------------------------------------------
# LoRA


def lora_targets(shape: ModelShape, target_modules: str | list[str]) -> list[LinearInfo]:
    """Linear layers peft wraps: all-linear = every Linear but the output layer; otherwise peft's matching rule
    and its one-line errors, shared with the fit (train/config.py target_matches, train/lora.py check_target_names)."""
    from train import lora

    if target_modules == "all-linear":
        return [l for l in shape.linears if l.name != shape.lm_head]
    names = [l.name for l in shape.linears]
    lora.check_target_names(names, target_modules, sorted({n.rsplit(".", 1)[-1] for n in names}))
    found = [l for l in shape.linears if target_matches(l.name, target_modules)]
    if not found:
        raise UserError(f"lora.target_modules: {target_modules!r} matches no linear layer (or use all-linear)")
    return found


def lora_tensor_numels(shape: ModelShape, lora: LoraCfg) -> list[int]:
    """Element count of every trainable tensor: per targeted Linear A = r*in and B = out*r
    (+ out for the DoRA magnitude), plus every parameter of lora.modules_to_save (trained in full)."""
    numels = []
    for l in lora_targets(shape, lora.target_modules):
        numels += [lora.r * l.in_features, l.out_features * lora.r]
    for name in lora.modules_to_save or []:
        numels += [l.in_features * l.out_features + (l.out_features if l.bias else 0)
                   for l in shape.linears if l.name == name or l.name.endswith("." + name)]
        numels += [n * d for e, n, d in shape.embeddings if e == name or e.endswith("." + name)]
    return numels


def lora_param_count(shape: ModelShape, lora: LoraCfg) -> int:
    """Trainable parameters: sum over targeted Linear layers of r * (in_features + out_features)
    (+ modules_to_save; DoRA magnitudes are counted separately by dora_magnitude_count)."""
    return sum(lora_tensor_numels(shape, lora))


def dora_magnitude_count(shape: ModelShape, lora: LoraCfg) -> int:
    """DoRA's trainable magnitude vector: out_features per targeted Linear (0 without use_dora)."""
    if not lora.use_dora:
        return 0
    return sum(l.out_features for l in lora_targets(shape, lora.target_modules))


def optimizer_state_bytes(numels: list[int], optimizer: str, param_bytes: int) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes in paged managed memory) of the optimizer states.

    paged_adamw_32bit / adamw_32bit (bitsandbytes): 8 B/param (two fp32 states); tensors of >= 1e5 elements
        are paged when the optimizer is paged
    paged_adamw_8bit / adamw_8bit: 2 B/param + 2 * 4 B per 256-element block for tensors >= 4096 elements,
        8 B/param below that
    adamw_torch: 2 states * param_bytes (torch keeps exp_avg/exp_avg_sq in the param dtype)
    """
    plain = paged = 0
    is_paged = optimizer.startswith("paged_")
    for n in numels:
        if optimizer == "adamw_torch":
            b = TORCH_ADAM_STATES * param_bytes * n
        elif optimizer.endswith("8bit") and n >= ADAM_8BIT_MIN_SIZE:
            b = ADAM_8BIT_STATE_BYTES * n + 2 * 4 * -(-n // ADAM_8BIT_BLOCKSIZE)
        else:
            b = ADAM_32BIT_STATE_BYTES * n
        if is_paged and n >= PAGED_MIN_NUMEL:
            paged += b
        else:
            plain += b
    return plain, paged


# --------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Precision:
    """Dtype sizes of the quantized (kbit) or plain bf16 pipeline.

    residual: bytes of the residual stream, the RMSNorm outputs and the q/k/v/gate/up matmul outputs:
      the compute dtype (2 for bf16/fp16), except k-bit with fp16/fp32 compute, where peft's
      prepare_model_for_kbit_training makes the embeddings and norm weights fp32 and bitsandbytes'
      Linear4bit returns its input dtype, so 4 (see upcasts()).
    lora: bytes per LoRA parameter (and its gradient).
    """

    kbit: bool
    compute: int
    residual: int
    lora: int


def upcasts(quant: QuantCfg) -> bool:
    """Whether train/model.py prepare_for_kbit casts the unquantized weights to fp32 (fp16 compute only)."""
    return quant.mode != "none" and quant.compute_dtype == "float16"


def precision(quant: QuantCfg) -> Precision:
    compute = DTYPE_BYTES[quant.compute_dtype]
    if quant.mode == "none":
        return Precision(False, compute, compute, LORA_FULL_PARAM_BYTES)
    residual = max(compute, FP32_BYTES) if upcasts(quant) else compute
    return Precision(True, compute, residual, LORA_KBIT_PARAM_BYTES)


def lora_input_copy_bytes(lora: LoraCfg, quant: QuantCfg) -> float:
    """Per in_feature of a targeted Linear, what its LoRA branch saves beyond the input x that the
    frozen base layer keeps anyway:

        k-bit, plain LoRA, dropout > 0   0      lora.kernel=fused keeps x and a seed or RNG state only
        k-bit, dropout == 0              0      lora_A saves x itself; 2 when autocast must copy an fp32
                                                input (the fp32 residual of fp16/fp32 compute)
        DoRA, quant.mode=none, or        2 + 1  peft's own dropout: bf16 output + bool mask (2 without dropout)
        lora.kernel=peft with dropout
    """
    mask = LORA_DROPOUT_MASK_BYTES if lora.dropout > 0 else 0
    if quant.mode == "none" or lora.use_dora or (lora.kernel == "peft" and lora.dropout > 0):
        return LORA_INPUT_BYTES + mask
    if lora.dropout > 0:
        return 0.0
    return LORA_INPUT_BYTES if upcasts(quant) else 0.0


def lora_saved_bytes_per_token(shape: ModelShape, lora: LoraCfg, quant: QuantCfg) -> float:
    """Per token per layer, what the LoRA branches save for the backward:

        sum over targeted Linear (in_features * lora_input_copy_bytes + 2 * r) / n_layers
    """
    copy = lora_input_copy_bytes(lora, quant)
    targets = [l for l in lora_targets(shape, lora.target_modules) if l.name != shape.lm_head]
    total = sum(l.in_features * copy + LORA_MID_BYTES * lora.r for l in targets)
    return total / shape.n_layers


def lora_freed_before_mlp_peak(shape: ModelShape, lora: LoraCfg, quant: QuantCfg) -> float:
    """Per token per layer: the saved LoRA input copy of the down projection(s) (Linear reading
    `intermediate` features), released by the time the MLP backward peaks."""
    copy = lora_input_copy_bytes(lora, quant)
    targets = [l for l in lora_targets(shape, lora.target_modules)
               if l.name != shape.lm_head and l.in_features == shape.intermediate]
    return sum(l.in_features * copy for l in targets) / shape.n_layers


def layer_saved_bytes_per_token(shape: ModelShape, lora: LoraCfg, quant: QuantCfg) -> dict[str, float]:
    """Bytes per token that one decoder layer saves for its backward (Llama-family block), by part.

        norms     = 2 * (4 * hidden + 4)                       fp32 norm inputs + rsqrt stats
        attention = 2 * (q_dim + 2 * kv_dim) + 2 * q_dim + 4 * heads
                                                               bf16 q, k, v, output; fp32 logsumexp per head
        mlp       = 3 * R * intermediate                       SiLU input, SiLU output, up (R = residual bytes:
                                                               4 in kbit mode, 2 for quant.mode=none)
        lora      = lora_saved_bytes_per_token(...)            2 * r per branch (+ input copies, see there)
        int8      = 2 * R * hidden + 2 * q_dim + R * intermediate   (quant.mode=int8 only: MatMul8bitLt
                                                               saves each matmul input)
    """
    p = precision(quant)
    h, i = shape.hidden, shape.intermediate
    parts = {
        "norms": NORMS_PER_LAYER * (NORM_SAVED_BYTES * h + NORM_STAT_BYTES),
        "attention": ATTN_QKV_BYTES * (shape.q_dim + 2 * shape.kv_dim) + ATTN_OUT_BYTES * shape.q_dim
        + ATTN_LSE_BYTES * shape.n_heads,
        "mlp": MLP_SAVED_TENSORS * p.residual * i,
        "lora": lora_saved_bytes_per_token(shape, lora, quant),
        "int8": 0.0,
    }
    if quant.mode == "int8" and INT8_SAVED_INPUTS:
        parts["int8"] = 2 * p.residual * h + p.compute * shape.q_dim + p.residual * i
    return parts


def backward_workspace_bytes_per_token(shape: ModelShape, quant: QuantCfg) -> float:
    """Gradient tensors live at once inside one layer's backward (MLP part, the largest), per token:

        3 * R * intermediate + 1 * R * hidden        (+ 4 * intermediate for quant.mode=none)
    """
    p = precision(quant)
    extra = 0 if p.kbit else BWD_NONE_LORA_GRAD_BYTES * shape.intermediate
    return (BWD_MLP_GRAD_TENSORS * p.residual * shape.intermediate
            + BWD_RESIDUAL_GRAD_TENSORS * p.residual * shape.hidden + extra)


def attention_backward_bytes_per_token(shape: ModelShape, quant: QuantCfg) -> float:
    """Bytes per token live inside one layer's attention backward, beside the layer inputs kept on the GPU:

        kernel    = 2 * 4 * q_dim + 2 * (q_dim + 2 * kv_dim) + 4 * heads  fp32 workspace, bf16 dq/dk/dv, fp32 D
        saved     = the layer's saved attention tensors (q, k, v, output, logsumexp)
        hidden    = 4 * 2 * hidden + R * hidden                         norm output, dO, layer output, branch
                                                                        grad; the layer output's gradient
    The same for FlashAttention 2 varlen (packed rows) and cuDNN (one long row, kernels/attention.py
    one_row_cudnn): measured on the 8B at 131,072 tokens, offloaded, FA2's buffers and cuDNN's (a 4.31 GB
    workspace = 8 * q_dim + 4 * heads bytes a token, plus dq/dk/dv) put the step's peak at 23.25 and 23.24 GB."""
    p = precision(quant)
    q, kv = shape.q_dim, shape.kv_dim
    kernel = ATTN_BWD_FP32_WORKSPACE * 4 * q + ATTN_GRAD_BYTES * (q + 2 * kv) + ATTN_SOFTMAX_D_BYTES * shape.n_heads
    saved = ATTN_QKV_BYTES * (q + 2 * kv) + ATTN_OUT_BYTES * q + ATTN_LSE_BYTES * shape.n_heads
    hidden = (ATTN_BWD_HIDDEN_TENSORS * ATTN_GRAD_BYTES + ATTN_BWD_RESIDUAL_GRADS * p.residual) * shape.hidden
    return kernel + saved + hidden


def dequant_workspace_bytes(shape: ModelShape, quant: QuantCfg) -> int:
    """bitsandbytes matmuls dequantize one weight at a time: 2 * max(in * out) over quantized Linear
    (bf16; 4 bytes for int8, whose backward dequantizes to its fp32 input dtype); 0 for quant.mode=none."""
    if quant.mode == "none":
        return 0
    per = DEQUANT_INT8_BYTES if quant.mode == "int8" else DEQUANT_BYTES
    return per * max((l.in_features * l.out_features for l in shape.quantized_linears()), default=0)


def activation_bytes(shape: ModelShape, cfg: Config, tokens: int) -> dict[str, float]:
    """{"saved", "working", "host"}: activations kept across the step on the GPU, one layer's recompute +
    backward, and the pinned CPU RAM of offloaded checkpoints.

    With gradient checkpointing (transformers checkpoints each decoder layer):
        saved   = tokens * (n_layers * R * hidden + rope + inputs)        one hidden state per layer
        working = tokens * (layer_saved - alias - freed + bwd) + dequant  the layer being recomputed
        (alias = R * hidden in kbit mode: the input norm saves the checkpointed fp32 input itself)
      offloaded (train.offload_checkpoints, kernels/offload.py): 3 instead of n_layers hidden states stay on the
      GPU (the layer being recomputed, the one prefetched, the embedding output); host = the pinned slabs for
      n_layers - 1 inputs (the last layer's stays) of R * hidden * (train.batch_size x data.max_length) bytes
      (offload.slab_sizes)
      The working set is the larger of the MLP backward's (above) and the attention backward's
      (tokens * attention_backward_bytes_per_token): the latter is the peak once the MLP is tiled.
    Without:
        saved   = tokens * (n_layers * layer_saved + rope + inputs)
        working = tokens * (bwd - freed) + dequant
    Tiled MLP (train.tile_mlp, kernels/tiled_mlp.py): the MLP's saved tensors and its backward's gradients
    (mlp_saved + 3 * R * intermediate per token) count for one chunk of TILE_TOKENS, not every token; each
    chunk's input (R * hidden per token) is kept instead.
    The peak is inside the MLP backward of the last layer, after the down projection's backward
    released its saved LoRA input (freed = lora_freed_before_mlp_peak).
    layer_saved = sum(layer_saved_bytes_per_token), bwd = backward_workspace_bytes_per_token,
    rope = 2 * head_dim * R (cos, sin), inputs = 24 (int64 ids, mask, labels).
    """
    from train.kernels import long_rows, tiled_mlp
    from train.kernels.offload import slab_sizes

    p = precision(cfg.quant)
    parts = layer_saved_bytes_per_token(shape, cfg.lora, cfg.quant)
    layer = sum(parts.values())
    bwd = backward_workspace_bytes_per_token(shape, cfg.quant) - lora_freed_before_mlp_peak(shape, cfg.lora, cfg.quant)
    shared = ROPE_TENSORS * shape.head_dim * p.residual + INPUT_BYTES_PER_TOKEN
    dequant = dequant_workspace_bytes(shape, cfg.quant)
    chunk_cost = 0.0  # bytes of the MLP that scale with one chunk's tokens instead of the whole micro-batch's
    if tiled_mlp.tiles(cfg.train.tile_mlp, tokens):
        mlp = parts["mlp"] + BWD_MLP_GRAD_TENSORS * p.residual * shape.intermediate
        chunk_cost = min(tokens, tiled_mlp.TILE_TOKENS) * mlp
        layer += p.residual * shape.hidden - parts["mlp"]
        bwd -= BWD_MLP_GRAD_TENSORS * p.residual * shape.intermediate
    gc = cfg.train.gradient_checkpointing is not False  # None = on, on the GPU this plans for
    if not gc:
        return {"saved": tokens * (shape.n_layers * layer + shared), "working": tokens * bwd + dequant + chunk_cost,
                "host": 0.0}
    alias = p.residual * shape.hidden if p.residual == NORM_SAVED_BYTES else 0
    on_gpu = shape.n_layers
    offload = long_rows.wants_offload(cfg.train.offload_checkpoints, gc)
    if offload:
        on_gpu = min(shape.n_layers, OFFLOAD_GPU_LAYERS) + OFFLOAD_KEPT_HIDDEN
    hidden = p.residual * shape.hidden
    reserved = max(tokens, cfg.train.batch_size * cfg.data.max_length)  # offload pins for its largest micro-batch
    mlp_peak = tokens * (layer - alias + bwd) + chunk_cost
    attention_peak = tokens * attention_backward_bytes_per_token(shape, cfg.quant)
    return {"saved": tokens * (on_gpu * hidden + shared),
            "working": max(mlp_peak, attention_peak) + dequant,
            "host": float(sum(slab_sizes(hidden * reserved, max(shape.n_layers - 1, 1)))) if offload else 0.0}


def loss_head_bytes(shape: ModelShape, quant: QuantCfg, tokens: int, fused: bool = FUSED_LM_HEAD) -> float:
    """Peak of the final norm + lm_head + loss, forward and backward.

    Both: the final norm's fp32 input (4 * hidden) and the head's copy of its output (R * hidden) saved.
    fused (TRL >= 1.16 SFTTrainer, no logits materialized):
        + 4 * hidden * tokens                                fp32 gradient of the hidden states
        + 2 * min(tokens, 4096) * 32768                      the bf16 logits tile buffer (full width even
                                                             when vocab < 32768)
        + 2 * min(vocab, 32768) * hidden                     bf16 copy of an fp32 lm_head slice (kbit only)
        + 2 * min(tokens, 4096) * hidden                     bf16 copy of the hidden tile (kbit only)
        + 48 * tokens                                        fp32 per-token statistics
    unfused (plain transformers ForCausalLMLoss, which computes the loss in fp32):
        + tokens * vocab * (2 + 4 + 4)                       bf16 logits, their fp32 upcast, fp32 gradient
        + 2 * vocab * hidden                                 bf16 autocast copy of an fp32 lm_head (kbit only)
    """
    p = precision(quant)
    h, v = shape.hidden, shape.vocab
    saved = tokens * (NORM_SAVED_BYTES + p.residual) * h
    casts = p.residual != p.compute  # fp32 lm_head / hidden are cast to bf16 for the matmul
    if not fused:
        return saved + tokens * v * (LOGITS_BYTES + LOGITS_FP32_BYTES + LOGITS_GRAD_BYTES) + (
            p.compute * v * h if casts else 0)
    tok_tile = min(tokens, FUSED_TOKEN_TILE)
    work = FUSED_TILE_BYTES * tok_tile * FUSED_VOCAB_TILE + FUSED_STATS_BYTES * tokens  # buffer is full width
    if casts:
        work += p.compute * (min(v, FUSED_VOCAB_TILE) + tok_tile) * h
    return saved + HEAD_GRAD_HIDDEN_COPIES * FP32_BYTES * tokens * h + work


# --------------------------------------------------------------------------------------------
# The estimate


def micro_batch_tokens(cfg: Config) -> int:
    """Tokens per micro-batch, worst case: train.batch_size * data.max_length (every row padded to full length)."""
    return cfg.train.batch_size * cfg.data.max_length


def estimate(cfg: Config, model_config, tokens: int | None = None, *, fused_lm_head: bool = FUSED_LM_HEAD
             ) -> dict[str, float]:
    """Predicted bytes per component (keys of COMPONENTS) plus "total", the predicted peak.

    base_weights           base_weight_bytes: quantized + other (as loaded)
    kbit_upcast            base_weight_bytes: upcast (+2 B per non-quantized param, k-bit with fp16 compute)
    lora_params            P * 2 (bf16, kbit) or P * (4 + 2) (quant.mode=none: fp32 + autocast bf16 copy),
                           P = lora_param_count; DoRA magnitudes at 4 B
    lora_grads             P * param bytes
    optimizer_states(_paged)  optimizer_state_bytes (8 B/param 32-bit, ~2 B/param 8-bit)
    activations_saved      activation_bytes: saved
    activations_working    activation_bytes: working
    loss_head              loss_head_bytes
    cuda_overhead          CUDA_OVERHEAD_BYTES
    total = sum of all components - min(activations_working, loss_head): the two working sets happen at
    different moments of the backward, so only the larger one adds to the peak.
    `tokens` defaults to batch_size * max_length (micro_batch_tokens); pass e.g. 2048/8192/16384 to
    compare with measured peaks at fixed micro-batch sizes.
    """
    if tokens is None:
        tokens = micro_batch_tokens(cfg)
    if tokens < 1:
        raise UserError(f"tokens must be >= 1, got {tokens}")
    shape = model_shape(model_config)
    p = precision(cfg.quant)
    base = base_weight_bytes(shape, cfg.quant)
    numels = lora_tensor_numels(shape, cfg.lora)
    n_lora = sum(numels)
    n_dora = dora_magnitude_count(shape, cfg.lora)
    lora_bytes = n_lora * p.lora + n_dora * DORA_MAGNITUDE_BYTES
    opt_plain, opt_paged = optimizer_state_bytes(numels, cfg.train.optimizer, p.lora)
    opt_plain += optimizer_state_bytes([n_dora], cfg.train.optimizer, DORA_MAGNITUDE_BYTES)[0] if n_dora else 0
    act = activation_bytes(shape, cfg, tokens)
    est = {
        "base_weights": float(base["quantized"] + base["other"]),
        "kbit_upcast": float(base["upcast"]),
        "lora_params": float(lora_bytes + (0 if p.kbit else n_lora * LORA_AUTOCAST_COPY_BYTES)),
        "lora_grads": float(lora_bytes),
        "optimizer_states": float(opt_plain),
        "optimizer_states_paged": float(opt_paged),
        "activations_saved": float(act["saved"]),
        "activations_working": float(act["working"]),
        "loss_head": float(loss_head_bytes(shape, cfg.quant, tokens, fused_lm_head)),
        "cuda_overhead": float(CUDA_OVERHEAD_BYTES),
    }
    est["total"] = sum(est.values()) - min(est["activations_working"], est["loss_head"])
    est["host_offload"] = float(act["host"])  # pinned CPU RAM, not GPU memory: outside the total
    return est


def torch_allocated(est: dict[str, float]) -> float:
    """The part of the total torch.cuda.max_memory_allocated() can see: total - paged optimizer states
    (cudaMallocManaged) - the CUDA context/overhead constant. Compare measured allocator peaks with this."""
    return est["total"] - est["optimizer_states_paged"] - est["cuda_overhead"]


def format_plan(cfg: Config, model_config, est: dict[str, float], tokens: int, gpu_gb: float) -> str:
    """The table `train plan` prints: one row per component in GB, the total and the fit verdict."""
    from train.kernels import tiled_mlp

    shape = model_shape(model_config)
    q = cfg.quant
    base = base_weight_bytes(shape, q)
    quant = q.mode if q.mode in ("int8", "none") else f"{q.mode}{' + double quant' if q.double_quant else ''}"
    targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else ",".join(cfg.lora.target_modules)
    n_lora = lora_param_count(shape, cfg.lora)
    lines = [
        f"memory plan: {cfg.model.name_or_path} ({shape.arch}, {sum(shape.params.values()):,} params)",
        f"  quant {quant}; LoRA r={cfg.lora.r} on {targets} ({n_lora:,} trainable); {cfg.train.optimizer}; "
        f"gradient checkpointing {'off' if cfg.train.gradient_checkpointing is False else 'on'}"
        + (", inputs offloaded to CPU" if est.get("host_offload") else "")
        + (f"; MLP in {tiled_mlp.TILE_TOKENS:,}-token chunks" if tiled_mlp.tiles(cfg.train.tile_mlp, tokens) else ""),
        f"  micro-batch: {tokens:,} tokens"
        + (f" ({cfg.train.batch_size} x {cfg.data.max_length}, every row at full length)"
           if tokens == micro_batch_tokens(cfg) else " (override)"),
        "",
    ]
    smaller = "loss_head" if est["loss_head"] <= est["activations_working"] else "activations_working"
    width = max(len(v) for v in COMPONENTS.values()) + 2
    lines.append(f"{'component':<{width}}{'GB':>8}")
    for key, label in COMPONENTS.items():
        if key == "kbit_upcast" and not est[key] or key == "optimizer_states_paged" and not est[key]:
            continue
        note = "  (not at the peak: the other working set is larger)" if key == smaller else ""
        if key == "base_weights" and base["quantized"]:
            note = f"  ({q.mode} linears {base['quantized'] / GB:.3f} + {q.compute_dtype} rest {base['other'] / GB:.3f})"
        lines.append(f"{label:<{width}}{est[key] / GB:>8.3f}{note}")
    lines.append(f"{'total (predicted peak)':<{width}}{est['total'] / GB:>8.3f}")
    headroom = gpu_gb - est["total"] / GB
    verdict = "yes" if headroom >= 0 else "no"
    lines += [
        f"{'  of which torch.cuda.max_memory_allocated sees':<{width}}{torch_allocated(est) / GB:>8.3f}"
        "  (no paged states, no CUDA context)",
        *([f"{'pinned CPU RAM (offloaded checkpoints)':<{width}}{est['host_offload'] / GB:>8.3f}  (not GPU memory)"]
          if est.get("host_offload") else []),
        "",
        f"fits on a {gpu_gb:g} GB GPU: {verdict} (headroom {headroom:.1f} GB)",
    ]
    return "\n".join(lines)


def plan_main(config_path: str, overrides: list[str], gpu_gb: float | None, tokens: int | None = None) -> int:
    """`python -m train plan`: load and validate the config, read the architecture only, print the plan."""
    from train.config import load_config

    if gpu_gb is None:
        gpu_gb = DEFAULT_GPU_GB
    if not gpu_gb > 0:
        raise UserError(f"--gpu-gb must be > 0 (e.g. 80 for an H100), got {gpu_gb}")
    if tokens is not None and tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    cfg = load_config(config_path, overrides)
    model_config = plan_model_config(cfg.model)
    n = tokens if tokens is not None else micro_batch_tokens(cfg)
    est = estimate(cfg, model_config, n)
    print(format_plan(cfg, model_config, est, n, gpu_gb))
    return 0


def as_gb(est: dict[str, Any]) -> dict[str, float]:
    """The same dict in GB (1e9 bytes), for reports and benchmarks."""
    return {k: v / GB for k, v in est.items()}
