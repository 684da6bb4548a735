"""Typed run configuration: YAML file + `--set key=value` overrides -> validated `Config`.

Everything is checked here, before any weights load: unknown keys (with the nearest valid one),
types, ranges and exclusive options. Every default carries a comment saying why.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from train.errors import UserError

log = logging.getLogger("train")


@dataclass
class RunCfg:
    output_dir: str = "runs/default"  # relative to the working directory; one directory per run
    seed: int = 42  # fixes LoRA init, data order and dropout, so runs are reproducible


@dataclass
class ModelCfg:
    name_or_path: str = ""  # hub id, local directory, or "builtin:tiny-llama" (the offline demo model)
    trust_remote_code: bool = False  # running a repo's Python is opt-in, never implied
    revision: Optional[str] = None  # pin a hub commit for reproducibility; None = the default branch
    # auto: varlen flash attention for padding-free batches on GPU (train/kernels/attention.py), else sdpa
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention"] = "auto"
    # transformers' hub kernels (on by default from 5.25) fetch code from the hub when a model loads and replace
    # layers under our own kernels; our kernels are the fast path and loading never depends on the hub
    hub_kernels: bool = False


@dataclass
class QuantCfg:
    mode: Literal["nf4", "fp4", "int8", "none"] = "nf4"  # NF4 is the QLoRA paper's best 4-bit type
    double_quant: bool = True  # quantizes the quantization constants too: ~0.4 bit/param saved, no quality cost
    # auto: bf16 on GPU (fast, no overflow); on CPU bf16 only where the CPU computes it natively (AVX512-BF16,
    # AMX), measured at start-up, else float32 (emulated bf16 matmuls run 8-180x slower than fp32: train/precision.py)
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    storage_dtype: Optional[Literal["uint8", "bfloat16", "float16", "float32"]] = None  # None=uint8; bf16 for FSDP


@dataclass
class LoraCfg:
    r: int = 16  # rank 16 on all linear layers matches full fine-tune quality on most SFT tasks
    alpha: int = 32  # alpha = 2r keeps the update scale constant when r changes
    dropout: float = 0.05  # light regularisation; small datasets may want 0.1
    target_modules: Union[str, list[str]] = "all-linear"  # all linear layers beat attention-only (QLoRA paper)
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r); helps only at large r
    use_dora: bool = False  # weight-decomposed LoRA; slower, sometimes better at low r
    modules_to_save: Optional[list[str]] = None  # extra modules trained in full (e.g. lm_head for new tokens)
    # LoRA on only the last N decoder layers: the backward pass then stops below them, so a step costs
    # (1 + N/layers) forwards instead of 2 (the CPU demo's lever); None = every layer, the quality default
    top_layers: Optional[int] = None
    # fused: each 4-bit layer and its adapter run as one autograd Function with the memory-lean dropout
    # (train/kernels/fused_lora.py, same math and adapter files, faster); fused_triton: the same with the dropout in
    # Triton kernels on GPU (0.3 GB less on an 8B, and faster in every same-run pair since session 6:
    # docs/benchmarks.md; torch's dropout where Triton cannot run); peft: peft's own modules, for comparison
    kernel: Literal["fused", "fused_triton", "peft"] = "fused_triton"
    # with a fused kernel, siblings that read one input (q/k/v, gate/up) run as one Function: fewer host calls on a
    # step that waits for the host (train/kernels/lora_group.py); false runs every layer alone
    groups: bool = True


def target_matches(name: str, targets: str | list[str]) -> bool:
    """What a lora.target_modules value selects, by peft's rule: a list entry matches a module name or its dotted
    suffix; a string is a regex that must fullmatch the name (all-linear is peft's own: the caller resolves it).
    Shared by the fit's checks (train/lora.py), the plan (train/plan.py) and the load (train/model.py)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class DataCfg:
    train: str = ""  # jsonl/json/csv/parquet file, or a hub dataset id
    eval: Optional[str] = None  # held-out file/id; exclusive with eval_fraction
    eval_fraction: float = 0.0  # carve this share of train out as eval when no eval file is given
    split: str = "train"  # split to read from a hub dataset (eval uses eval_split)
    eval_split: str = "test"  # split of a hub dataset used when data.eval names the same id
    format: Literal["prompt_completion", "messages", "alpaca", "text"] = "prompt_completion"  # most SFT data
    prompt: str = "{prompt}"  # template over row fields; the model sees this and is not trained on it
    completion: str = "{completion}"  # template over row fields; the only tokens that carry loss
    text: str = "{text}"  # template for format=text: every token carries loss
    messages_field: str = "messages"  # column holding [{role, content}, ...] for format=messages
    max_length: int = 1024  # tokens per example; longer rows are cut as data.truncation says
    truncation: Literal["prompt_middle", "keep_start", "drop"] = "prompt_middle"  # never cut the answer
    # tokens every cut prompt leaves for its completion; None = the longest training completion. The same for
    # every row, so a cut prompt's length never reveals its own answer's length
    completion_budget: Optional[int] = None
    max_rows: Optional[int] = None  # cap rows read from train (quick experiments); None = all
    # which max_rows rows: random = a sample seeded by run.seed, kept in file order (default: a file's head is
    # often one category or one date range, so the first rows can be unlike the rest); first = the head
    sample: Literal["random", "first"] = "random"


@dataclass
class TrainCfg:
    max_steps: Optional[int] = None  # optimizer steps; exclusive with epochs
    epochs: Optional[float] = None  # passes over the data; used when max_steps is unset (default 1)
    lr: float = 2e-4  # the QLoRA paper's rate for 7B-13B models with r=16-64
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"  # smooth decay
    warmup_ratio: float = 0.03  # 3% warmup avoids early spikes from fresh Adam moments
    batch_size: int = 16  # sequences per device per micro-step; padding-free, so no pad tokens are computed
    grad_accum: int = 1  # one big padding-free micro-step beats 8x2 by 61% on an H100 (docs/benchmarks.md)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"] = "paged_adamw_32bit"
    weight_decay: float = 0.0  # LoRA weights are few; decay rarely helps
    max_grad_norm: float = 0.3  # QLoRA paper's clip; stabilises 4-bit training
    # recompute each layer in the backward instead of keeping its activations: most activation memory for a third
    # more compute. None = on a GPU (memory is what runs out), off on a CPU (RAM is plentiful, compute is not)
    gradient_checkpointing: Optional[bool] = None
    save_every: int = 100  # optimizer steps between checkpoints
    save_total_limit: Optional[int] = 3  # keep the newest N checkpoints; None keeps all
    eval_every: Optional[int] = None  # steps between evals; None = only at the end; 0 = none (train eval runs after)
    logging_steps: int = 1  # every step into metrics.jsonl: cheap and makes curves exact
    resume: str = "auto"  # auto | never | path/to/checkpoint-N
    bf16: Optional[bool] = None  # None = follow quant.compute_dtype (bf16 mixed precision when bfloat16)
    # padding_free: each micro-batch's rows are concatenated (no pad tokens, rows never attend to each
    # other); bfd: rows packed into data.max_length bins; none: pad to the longest row
    packing: Literal["padding_free", "bfd", "none"] = "padding_free"
    liger: bool = True  # Liger Triton kernels (RMSNorm, SwiGLU, RoPE) on GPU; ignored on CPU
    # checkpointed layer inputs in pinned CPU RAM, copied back one layer ahead of the recompute (kernels/offload.py).
    # auto = on a GPU with checkpointing, at any length: 34 GB of them at 131K on an 8B; on the 2,048-token bench
    # workload 2.2 GB, for 1.9 % tok/s (session 9: four same-machine pairs, docs/benchmarks.md)
    offload_checkpoints: Literal["auto", True, False] = "auto"
    # the MLP in token chunks in the forward, recompute and backward (kernels/tiled_mlp.py). auto = calls of
    # >= 32,768 tokens, where its tokens x intermediate_size tensors dominate; below, the extra forward costs more
    tile_mlp: Literal["auto", True, False] = "auto"


@dataclass
class LogCfg:
    report_to: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)  # none by default: no accounts
    project: str = "qlora-train"  # wandb project name
    run_name: Optional[str] = None  # None = the output directory's name


@dataclass
class EvalCfg:
    task: Literal["none", "numeric", "exact", "choice"] = "none"  # task metric besides loss
    limit: Optional[int] = 200  # eval rows used by `train eval`; None = all
    # which eval.limit (and during_training_limit) rows: random = a sample seeded by run.seed, kept in file
    # order (default: a file's head is often sorted or grouped, so its first rows can mislead); first = the head
    sample: Literal["random", "first"] = "random"
    batch_size: int = 8  # rows per forward/generate batch
    max_new_tokens: int = 16  # greedy tokens generated per row for task metrics
    during_training_limit: int = 32  # rows for the task metric run every train.eval_every steps
    labels: Optional[list[str]] = None  # label set for task=choice
    hit_abs: float = 40.0  # numeric: "hit" (green) when |error| < this ...
    hit_rel: float = 0.2  # ... or relative error < this (the course's Tester)
    near_abs: float = 80.0  # numeric: "near" (orange) when |error| < this ...
    near_rel: float = 0.4  # ... or relative error < this; else "miss" (red)
    # `train eval` when a data file whose rows it scores changed since fit (data_record.json): refuse, because the
    # held-out rows are re-derived from data.train by a seeded shuffle, so a changed file silently moves trained
    # rows into the eval set and the report overstates the adapter; a demanding user wants a number they can
    # trust or none. warn: score the file as it is now, with one warning line
    on_data_change: Literal["refuse", "warn"] = "refuse"


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    quant: QuantCfg = field(default_factory=QuantCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    log: LogCfg = field(default_factory=LogCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `key=value` overrides, type-check and validate. Raises UserError.

    The command line wins over the file: `--set train.max_steps=300` on a file that sets train.epochs
    drops the file's train.epochs (one line says so) instead of refusing the two as exclusive."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    source = str(path) if path else "--set"
    return from_dict(raw, source=source, origins=apply_overrides(raw, overrides, source))


def apply_overrides(raw: dict[str, Any], overrides, source: str) -> dict[str, str]:
    """Apply `key=value` items to `raw` (the file's side of an exclusive pair that they set is dropped,
    in one line). Returns "section.key" -> "--set section.key=value", for errors that name the item."""
    origins: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
        origins[key] = f"--set {item.strip()}"
    _command_line_wins(raw, origins, source)
    return origins


# Pairs of keys that cannot both be set; validate() refuses both from one place (file or --set)
EXCLUSIVE = (("train.max_steps", "train.epochs"), ("data.eval", "data.eval_fraction"))


def _is_set(value: Any) -> bool:
    """A value that takes effect: null and a zero eval_fraction mean "not set"."""
    return value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _command_line_wins(raw: dict[str, Any], origins: dict[str, str], source: str) -> None:
    """Drop the file's side of an exclusive pair whose other side --set gives, and say so in one line."""
    for pair in EXCLUSIVE:
        for mine, other in (pair, pair[::-1]):
            if mine in origins and other not in origins and _is_set(_get(raw, mine)) and _is_set(_get(raw, other)):
                section, name = other.split(".")
                log.info("%s replaces %s: %s from %s", origins[mine], other, raw[section].pop(name), source)


def _get(raw: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    values = raw.get(section)
    return values.get(name) if isinstance(values, dict) else None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass the path to a YAML file (see configs/demo.yaml)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        if isinstance(e, _DuplicateKey):
            raise UserError(f"{path}:{line} has a {e.problem}") from None
        raise UserError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a mapping of sections (run:, model:, ...)")
    return raw


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except a key given twice is an error: YAML would silently keep only the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r}; YAML would keep only the last one, "
                                    "so merge the two into one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal string
    if isinstance(value, dict):
        value = text  # "{price}" or "Q: {text}" parse as YAML mappings; no key takes one, users mean text
    if isinstance(value, str) and _FLOAT_RE.match(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string; users mean a number
    return key.strip(), value


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--set {key}: keys look like section.name, e.g. --set train.lr=1e-4")
    section, name = parts
    valid = {f.name for f in dataclasses.fields(Config)}
    if section not in valid:
        raise UserError(f"--set {key}: unknown section {section!r}{_nearest(section, valid)}")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise UserError(f"--set {key}: section {section!r} in the file is not a mapping")
    target[name] = value


def from_dict(raw: dict[str, Any], source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """`origins`: "section.key" -> the `--set` item that gave it; errors about those keys name the --set
    item instead of `source` (the file)."""
    origins = origins or {}
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise UserError(f"{source}: unknown section {name!r}{_nearest(name, sections)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{source}: section {name!r} must be a mapping of keys, got {type(value).__name__}; "
                            f"indent its keys under {name}: (see configs/demo.yaml)")
        built[name] = _build_section(sections[name].default_factory, name, value, source, origins)
    cfg = Config(**built)
    validate(cfg, source, origins)
    return cfg


def _build_section(cls: type, section: str, values: dict[str, Any], source: str, origins: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        where = origins.get(f"{section}.{key}", source)
        if key not in hints:
            raise UserError(f"{where}: unknown key {section}.{key}{_nearest(key, hints, section)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", where)
    return cls(**kwargs)


# Names from transformers/TRL/peft that users carry over; difflib alone would suggest unrelated keys
# (learning_rate -> logging_steps, gradient_accumulation_steps -> gradient_checkpointing).
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "warmup_steps": "warmup_ratio", "optim": "optimizer",
           "lr_scheduler_type": "lr_scheduler", "save_steps": "save_every", "eval_steps": "eval_every",
           "resume_from_checkpoint": "resume", "rank": "r", "lora_r": "r", "lora_alpha": "alpha",
           "lora_dropout": "dropout", "max_seq_length": "max_length", "model_name_or_path": "name_or_path",
           "bits": "mode", "load_in_4bit": "mode", "bnb_4bit_quant_type": "mode"}


def _nearest(name: str, options, section: str | None = None) -> str:
    alias = ALIASES.get(name)
    match = [alias] if alias in options else difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    if not match:
        return f"; valid: {', '.join(sorted(options))}"
    return f"; did you mean {section + '.' if section else ''}{match[0]}?"


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; allow int->float widening only. Returns the value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, key, source)
            except UserError as e:
                errors.append(e)
        raise errors[-1] if len(errors) == 1 else UserError(f"{source}: {key} must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            allowed = " | ".join(str(a) for a in args)
            raise UserError(f"{source}: {key} must be one of {allowed}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: {key} must be a list, e.g. [a, b], got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.match(value):
        return float(value)  # YAML 1.1 reads `lr: 2e-4` (no dot) as a string; users mean a number
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise UserError(f"{source}: {key} must be {_describe(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{source}: {key} must be {_describe(tp)}, got {type(value).__name__} {value!r}")
    return value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "null")


# --------------------------------------------------------------------------------------------
# Ranges and cross-field rules


def validate(cfg: Config, source: str = "config", origins: dict[str, str] | None = None) -> None:
    """Ranges and cross-field rules. An error names the `--set` item that gave the key (`origins`), else `source`."""
    origins = origins or {}

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise UserError(f"{origins.get(key, source)}: {key} {rule}, got {value!r}")

    need(bool(cfg.model.name_or_path), "model.name_or_path", "is required (hub id or local path)", "")
    need(bool(cfg.data.train), "data.train", "is required (a data file or hub dataset id)", "")
    need(bool(cfg.run.output_dir), "run.output_dir", "is required", "")
    need(cfg.lora.r > 0, "lora.r", "must be > 0 (try 16)", cfg.lora.r)
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0 (try 2*r)", cfg.lora.alpha)
    need(cfg.lora.top_layers is None or cfg.lora.top_layers > 0, "lora.top_layers",
         "must be >= 1 (or null for every layer)", cfg.lora.top_layers)
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)", cfg.lora.dropout)
    need(cfg.train.lr > 0, "train.lr", "must be > 0 (try 2e-4)", cfg.train.lr)
    need(0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", cfg.train.warmup_ratio)
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1", cfg.train.batch_size)
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1", cfg.train.grad_accum)
    need(cfg.train.save_every >= 1, "train.save_every", "must be >= 1", cfg.train.save_every)
    need(cfg.train.max_grad_norm > 0, "train.max_grad_norm", "must be > 0", cfg.train.max_grad_norm)
    need(cfg.train.logging_steps >= 1, "train.logging_steps", "must be >= 1", cfg.train.logging_steps)
    need(cfg.data.max_length >= 8, "data.max_length", "must be >= 8 tokens", cfg.data.max_length)
    budget = cfg.data.completion_budget
    need(budget is None or 1 <= budget < cfg.data.max_length, "data.completion_budget",
         "must be >= 1 and below data.max_length (or null: the longest training completion)", budget)
    need(0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)", cfg.data.eval_fraction)
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1", cfg.eval.batch_size)
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", cfg.eval.max_new_tokens)
    need(cfg.train.eval_every is None or cfg.train.eval_every >= 0, "train.eval_every",
         "must be >= 0 (0: no eval during fit; or null: at the end only)", cfg.train.eval_every)
    for key in ("train.max_steps", "train.epochs", "data.max_rows", "eval.limit"):
        need(_attr(cfg, key) is None or _attr(cfg, key) > 0, key, "must be > 0 (or null)", _attr(cfg, key))
    _check_combinations(cfg, source, origins)
    _check_templates(cfg, source, origins)


def _check_combinations(cfg: Config, source: str, origins: dict[str, str]) -> None:
    """Rules across keys; an error names where the keys were set (one file or --set item, or both)."""
    def where(*keys: str) -> str:
        return " and ".join(dict.fromkeys(origins.get(k, source) for k in keys))

    for a, b in EXCLUSIVE:
        if _is_set(_attr(cfg, a)) and _is_set(_attr(cfg, b)):
            raise UserError(f"{where(a, b)}: {a} and {b} are exclusive; set only one")
    if cfg.lora.use_dora and cfg.quant.mode == "int8":
        raise UserError(f"{where('lora.use_dora', 'quant.mode')}: lora.use_dora does not support quant.mode=int8; "
                        "use nf4 or disable DoRA")
    if cfg.eval.task == "choice" and not cfg.eval.labels:
        raise UserError(f"{where('eval.task')}: eval.task=choice needs eval.labels, e.g. [positive, negative]")
    if cfg.eval.task != "none" and cfg.data.format == "text":
        raise UserError(f"{where('eval.task', 'data.format')}: eval.task={cfg.eval.task} needs prompts to generate "
                        "from, and data.format=text has none; use data.format=prompt_completion or set eval.task: none")
    resume = cfg.train.resume
    if not (resume in ("auto", "never") or resume.strip()):
        raise UserError(f"{where('train.resume')}: train.resume must be auto | never | a path, got {resume!r}")


def _attr(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_templates(cfg: Config, source: str, origins: dict[str, str]) -> None:
    used = {"prompt_completion": ("prompt", "completion"), "text": ("text",)}.get(cfg.data.format, ())
    for name in used:
        template, where = getattr(cfg.data, name), origins.get(f"data.{name}", source)
        try:
            fields = template_fields(template)
        except ValueError as e:
            raise UserError(f"{where}: data.{name} is not a valid template ({e}); use {{column}} placeholders")
        if not fields:
            raise UserError(f"{where}: data.{name} must name at least one {{column}}, got {template!r}")


def template_fields(template: str) -> list[str]:
    """Column names a str.format template reads ('{price:.0f}' -> ['price'])."""
    import string

    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name or not name.isidentifier():
                raise ValueError(f"placeholder {{{name}}} must be a column name")
            names.append(name)
    return names


def dump_config(cfg: Config, path: Path) -> None:
    """Write the fully resolved config (what actually ran) as YAML, atomically (temp file + rename)."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
