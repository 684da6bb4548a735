"""Base model and tokenizer: config -> BitsAndBytesConfig, quantized load (on a CPU computing in fp32, a large
vocabulary's embeddings and LM head kept in the checkpoint's 16-bit dtype), memory report, k-bit prep."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from train import gguf, patches, precision, tiny
from train.kernels import attention
from train.config import Config, ModelCfg, QuantCfg, target_matches
from train.errors import UserError

log = logging.getLogger("train")

DTYPES = precision.DTYPES

# bitsandbytes' CPU 4-bit decode kernel asserts out_features % 32 == 0 (its CPU backend, bitsandbytes >= 0.48).
CPU_BNB_MULTIPLE = 32

# fp32 compute keeps the input embedding and LM head in the checkpoint's 16-bit dtype only when that saves at least
# this many bytes: Gemma 3 1B's tied 262144 x 1152 table saves 0.60 GB, Qwen2.5-0.5B's 0.27 GB; below it the saving
# is small next to a run's peak and the plain fp32 path stays (SmolLM2-135M, the demo: 57 MB, its speed unchanged)
KEEP_16BIT_MIN_SAVED = 0.25e9
SIXTEEN_BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # checkpoint dtypes whose matrices can stay
SAFETENSORS_FLOATS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}  # header -> torch name


def build_bnb_config(q: QuantCfg, skip_modules: list[str] | None = None):
    """quant.* -> BitsAndBytesConfig (None for quant.mode=none). Pure: no GPU, no weights."""
    from transformers import BitsAndBytesConfig

    if q.mode == "none":
        return None
    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules or None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,  # "nf4" | "fp4"
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=precision.torch_dtype(q),
        bnb_4bit_quant_storage=DTYPES[q.storage_dtype or "uint8"],
        llm_int8_skip_modules=skip_modules or None,  # transformers reads this for 4-bit too
    )


def resolve_model_path(m: ModelCfg) -> str:
    """Local dir, .gguf file or builtin (both materialised to the cache once) or hub id; a missing local path
    is a UserError."""
    name = m.name_or_path
    if tiny.is_builtin(name):
        return str(tiny.materialize(name))
    if gguf.is_gguf(name):
        return str(gguf.resolve(name))
    path = local_model_dir(name)
    return name if path is None else str(path)


def local_model_dir(name: str) -> Path | None:
    """The local model folder `name` means, None for a hub id; a local-looking name without config.json is a
    UserError. Shared with `train plan` (train/plan.py), so both read a name the same way."""
    path = Path(name).expanduser()
    if not (name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1):
        return None
    if not (path / "config.json").is_file():
        raise UserError(
            f"model.name_or_path: {name} is not a model directory (no config.json); "
            "give a local HF-format model dir, a .gguf file, a hub id like Qwen/Qwen2.5-0.5B, or builtin:tiny-llama"
        )
    return path


def load_model_config(path: str, m: ModelCfg):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except OSError as e:
        offline = " (offline: HF_HUB_OFFLINE is set, so only cached models load)" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"model.name_or_path: cannot load {path!r}{offline}: {str(e).splitlines()[0]} "
                        "Check the hub id, or give a local model directory") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"model.name_or_path: {path} needs custom code; review it, then set model.trust_remote_code: true"
            ) from None
        raise UserError(f"model.name_or_path: {path}: {str(e).splitlines()[0]}") from None


def preflight(cfg: Config, path: str):
    """Before any weights load: the model's config loads and model.attn_implementation can run this model
    (one-line UserError otherwise). Returns the model config (lora.preflight checks the targets on it)."""
    model_config = load_model_config(path, cfg.model)
    attention.choose(cfg, model_config)
    return model_config


def meta_model(model_config):
    """The model's module tree on the meta device: shapes and names, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(model_config)
    meta.tie_weights()  # from_config leaves tied embeddings untied on meta: counts would double them
    return meta


def narrow_linear_layers(model_config, multiple: int = CPU_BNB_MULTIPLE) -> list[str]:
    """Names of Linear layers whose out_features is not a multiple of `multiple` (meta device: no memory)."""
    names = set()
    for name, mod in meta_model(model_config).named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.out_features % multiple:
            names.add(name.rsplit(".", 1)[-1])  # skip-lists match by module-name suffix
    return sorted(names)


def output_embedding(model_config) -> list[str]:
    """Name of the output embedding (lm_head). transformers keeps it unquantized only when given no skip
    list; our own list replaces that default, and a tied lm_head quantized in 4-bit fails at inference."""
    meta = meta_model(model_config)
    head = meta.get_output_embeddings()
    return [name for name, mod in meta.named_modules() if head is not None and mod is head]


def count_params(model_config) -> int:
    return sum(p.numel() for p in meta_model(model_config).parameters())


def sharded_launch() -> str | None:
    """"fsdp" or "deepspeed" when `accelerate launch` shards the model across processes, else None."""
    for name, env in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(env, "false").lower() in ("1", "true"):
            return name
    return None


def device_map() -> dict[str, Any] | None:
    """Each process loads the whole base on its own GPU (never "auto": that splits it across ranks' GPUs).
    Under FSDP/DeepSpeed: None (transformers refuses a device_map with ZeRO-3; bitsandbytes then loads
    onto the process's current GPU, and FSDP/ZeRO-3 shard it when the Trainer wraps the model)."""
    if torch.cuda.is_available() and sharded_launch() is None:
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return None


def load_base(cfg: Config, path: str, quiet: bool = False):
    """Load the base model quantized as quant.* says; prints footprint vs bf16."""
    from transformers import AutoModelForCausalLM

    model_config = load_model_config(path, cfg.model)
    skip = []
    if cfg.quant.mode != "none" and not torch.cuda.is_available():
        skip = narrow_linear_layers(model_config)
        if skip and not quiet:
            log.warning(
                "CPU: bitsandbytes' 4-bit CPU kernels need out_features %% %d == 0; keeping %s in %s, "
                "quantizing the rest (on GPU every layer is quantized)",
                CPU_BNB_MULTIPLE, ", ".join(skip), precision.compute_dtype(cfg.quant),
            )
        skip = skip and skip + output_embedding(model_config)
    keep = keep_16bit_plan(cfg, model_config, path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=build_bnb_config(cfg.quant, skip),
        dtype=keep.load if keep else precision.torch_dtype(cfg.quant),
        device_map=device_map(),
        # the hub's kernels (transformers >= 5.25 turns them on by default): they need the hub at load time, and
        # would swap layers under our fused LoRA path; model.hub_kernels opts in
        use_kernels=cfg.model.hub_kernels,
        attn_implementation=attention.resolve(cfg, model_config),
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    keep_cpu_weights_exact(model)
    if keep:
        keep_16bit(model, keep, quiet)
    if not quiet:
        report_memory(model, model_config, cfg.quant.mode)
    return model


@dataclasses.dataclass(frozen=True)
class Keep16:
    dtype: torch.dtype  # what the input embedding and LM head stay in: the checkpoint's own 16-bit dtype
    load: torch.dtype  # what from_pretrained loads in: that dtype (never an fp32 copy of them), else fp32
    saved: int  # bytes saved against fp32


def keep_16bit_plan(cfg: Config, model_config, path: str) -> Keep16 | None:
    """Whether fp32 compute (a CPU without native bf16) keeps the input embedding and LM head in the checkpoint's
    16-bit dtype, and what to load in; None: the plain fp32 load. Only for a quantized base whose checkpoint is
    16-bit, whose LoRA neither targets nor trains those matrices, and where it saves KEEP_16BIT_MIN_SAVED."""
    name = str(getattr(model_config, "dtype", None)).removeprefix("torch.")
    dtype = SIXTEEN_BIT.get(name)
    if (torch.cuda.is_available() or cfg.quant.mode == "none" or dtype is None
            or precision.compute_dtype(cfg.quant) != "float32" or precision.use_bf16(cfg)):
        return None
    text = model_config.get_text_config()
    if 4 * (getattr(text, "vocab_size", 0) or 0) * (getattr(text, "hidden_size", 0) or 0) < KEEP_16BIT_MIN_SAVED:
        return None  # two vocab x hidden matrices at most: no need to build the model's tree to know
    meta = meta_model_in(model_config, dtype)
    emb, head = meta.get_input_embeddings(), meta.get_output_embeddings()
    if not (precision.embedding_supported(emb) and (head is None or precision.head_supported(head))):
        return None
    names = {mod: n for n, mod in meta.named_modules()}
    if any(lora_touches(names[m], cfg.lora) for m in (emb, head) if m is not None):
        return None  # trained or LoRA-wrapped: peft would cast its adapters to the 16-bit dtype
    saved = 2 * sum({id(m.weight): m.weight.numel() for m in (emb, head) if m is not None}.values())  # 4 B -> 2 B
    stored = stored_float_dtypes(path)
    if saved < KEEP_16BIT_MIN_SAVED or (stored is not None and name not in stored):
        return None  # too small to matter, or config.json names a dtype the weight files do not hold
    # a 16-bit load computes what an fp32 one does where the files hold only that dtype, bitsandbytes 4-bit
    # quantizes in fp32 whatever it is given, and no buffer is made 16-bit (embed_scale aside: restored exactly)
    odd = [n for n, b in meta.named_buffers() if b.is_floating_point() and b.dtype == dtype
           and n != f"{names[emb]}.embed_scale"]
    exact = cfg.quant.mode in ("nf4", "fp4") and not odd and stored == {name}
    return Keep16(dtype, dtype if exact else torch.float32, saved)


def meta_model_in(model_config, dtype: torch.dtype):
    """meta_model built with `dtype` as torch's default, as from_pretrained builds a model it loads in `dtype`
    (buffers made in the default dtype come out in it)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return meta_model(model_config)
    finally:
        torch.set_default_dtype(default)


def holds_exactly(weight: torch.Tensor, dtype: torch.dtype, rows: int = 8192) -> bool:
    """Whether `weight` survives a round trip through `dtype` unchanged, `rows` at a time (8192: a 38 MB fp32
    round-trip copy for Gemma 3 1B's table, never a full-size one)."""
    return all(torch.equal(part.to(dtype).to(part.dtype), part) for part in weight.split(rows))


def lora_touches(name: str, l) -> bool:
    """Whether LoRA touches module `name`: a target_modules match (all-linear aside, which leaves out the LM
    head) or a modules_to_save entry that ends the name (peft's rules)."""
    hit = l.target_modules != "all-linear" and target_matches(name, l.target_modules)
    return hit or any(name.endswith(t) for t in l.modules_to_save or [])


def stored_float_dtypes(path: str) -> set[str] | None:
    """The dtypes of the floating tensors in a local checkpoint's .safetensors files (headers only: nothing loads),
    e.g. {"bfloat16"}; None where there are none to read (a hub id, .bin weights)."""
    from safetensors import safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    found = set()
    for file in files:
        with safe_open(str(file), "pt") as f:
            found |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return {SAFETENSORS_FLOATS.get(d, d) for d in found if d in SAFETENSORS_FLOATS or d.startswith("F8")} or None


@torch.no_grad()
def keep_16bit(model, keep: Keep16, quiet: bool = False) -> None:
    """The input embedding and LM head in keep.dtype, computing in fp32 from them (train/precision.py); every other
    floating parameter and buffer in fp32, as a plain fp32 load leaves them (a 16-bit load held the checkpoint's
    values, so the upcast is exact). bitsandbytes' 4-bit weights dequantize to fp32 as after an fp32 load."""
    import bitsandbytes as bnb

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    matrices = {id(m.weight): m.weight for m in (emb, head) if m is not None}
    if not all(w.dtype == keep.dtype or holds_exactly(w, keep.dtype) for w in matrices.values()):
        log.info("CPU float32 compute: the checkpoint's embeddings are not %s values; keeping them in float32",
                 str(keep.dtype)[6:])
        return
    for w in matrices.values():
        w.data = w.data.to(keep.dtype)  # after an fp32 load: the checkpoint's 16-bit values, exact (checked)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in matrices \
                    and not isinstance(p, bnb.nn.Params4bit):  # 4-bit data in a float quant.storage_dtype: bytes
                p.data = p.data.float()
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != torch.float32:
                setattr(module, name, b.float())
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            module.weight.quant_state.dtype = torch.float32  # it records the load dtype; dequantize returns it
    model.config.dtype = torch.float32  # what the run computes in, as an fp32 load records
    precision.compute_from_16bit(emb, head)
    if not quiet:
        how = "" if keep.load == keep.dtype else " (loaded in float32, then cast: a higher peak at load)"
        log.info("CPU float32 compute: embeddings and LM head kept in %s (%.2f GB saved), computed in float32%s",
                 str(keep.dtype)[6:], keep.saved / 1e9, how)


def keep_cpu_weights_exact(model) -> None:
    """bitsandbytes' CPU inference repacking of 4-bit weights off (train/patches.py says why)."""
    patches.keep_cpu_weights_exact(model)


def report_memory(model, model_config, mode: str) -> dict[str, float]:
    gb = 1e9
    footprint = model.get_memory_footprint() / gb
    bf16 = count_params(model_config) * 2 / gb
    log.info("base model loaded (%s): %.3f GB in memory; the same model in bf16 would take %.3f GB", mode, footprint, bf16)
    return {"footprint_gb": footprint, "bf16_gb": bf16}


def load_tokenizer(path: str, m: ModelCfg, padding_side: str = "right", quiet: bool = False):
    """Tokenizer with a pad token that is never the EOS token when an alternative exists.

    Our labels come from explicit masks (train/data.py), so even pad == eos cannot hide EOS from the
    loss; still, a distinct pad keeps attention masks and generation unambiguous.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError) as e:
        load_model_config(path, m)  # a problem with the model itself (custom code, offline, no config) comes first
        if "trust_remote_code" in str(e):
            raise UserError(f"model.name_or_path: {path} needs custom code; review it, then set "
                            "model.trust_remote_code: true") from None
        files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in files):
            raise UserError(f"model.name_or_path: {path} has no tokenizer files ({', '.join(files)}); "
                            "copy the tokenizer in beside config.json") from None
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(f"model.name_or_path: cannot load the tokenizer of {path!r}{offline}: "
                        f"{str(e).splitlines()[0]}") from None
    if tok.eos_token is None:
        raise UserError(f"model.name_or_path: tokenizer of {path} has no EOS token; the model could never stop")
    if tok.pad_token is None:
        reserved = [t for t in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>") if t in tok.get_vocab()]
        tok.pad_token = reserved[0] if reserved else (tok.unk_token or tok.eos_token)
        if not quiet:
            log.info("tokenizer has no pad token; using %r for padding (masked out of the loss)", tok.pad_token)
    tok.padding_side = padding_side
    return tok


def prepare_for_kbit(model, cfg: Config):
    """Freeze the base; with fp16 compute also cast the unquantized weights to fp32 (peft's prep).

    With bf16 compute the embeddings, norms and lm_head stay bf16: peft's upcast to fp32 makes every
    hidden state fp32, costing 6.3 GB and 42% of tokens/s on an 8B model (docs/benchmarks.md) for no
    stability gain, since bf16 has fp32's range. TRL's own QLoRA path does not upcast either. With fp32 compute
    they were loaded in fp32 already.

    Gradient checkpointing and input-grad hooks are NOT enabled here: the Trainer enables
    checkpointing from SFTConfig (use_reentrant=True) and TRL 1.x calls enable_input_require_grads
    itself, so doing it here too would double-prepare.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quant.mode == "none" or precision.compute_dtype(cfg.quant) != "float16":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def base_fingerprint(path: str) -> dict[str, Any]:
    """What identifies a base model: its architecture config (used to refuse adapters from another base)."""
    config = json.loads((Path(path) / "config.json").read_text()) if Path(path).is_dir() else {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    return {k: config.get(k) for k in keys}
