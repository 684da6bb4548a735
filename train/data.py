"""Data: read rows (jsonl/json/csv/parquet/hub), render templates, tokenize with loss masks, record the files read.

A fit records its data files' hashes (data_record.json) so that `train eval` can tell when one changed.

We tokenize here instead of letting SFTTrainer do it because (1) we must count and report the rows
cut by data.max_length and the rows dropped, and why, and (2) TRL truncates the *end* of
prompt+completion, which cuts off the answer (e.g. the price); we cut the middle of the prompt
instead, and use the identical prompt tokens at generation time. SFTTrainer accepts the result
as-is (a dataset with input_ids + labels skips its own preparation).
"""

from __future__ import annotations

import copy

import csv
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.config import Config, DataCfg, template_fields
from train.errors import UserError

log = logging.getLogger("train")

IGNORE = -100  # label value the loss ignores
ROLES = {"system", "user", "assistant", "tool"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{has_input}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# --------------------------------------------------------------------------------------------
# Reading


def read_rows(spec: str, split: str = "train", max_rows: int | None = None,
              key: str = "data.train") -> list[dict[str, Any]]:
    """Rows of a local file or hub dataset as dicts. Errors name the key, the file and the 1-based row/line."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        try:
            rows = _read_local(path, key)
        except UnicodeDecodeError as e:
            raise UserError(f"{key}: {path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    else:
        rows = _read_hub(spec, split, key)
    if not rows:
        raise UserError(f"{key}: {spec} has no rows; add rows or point {key} at a non-empty file")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{key}: {spec} row {i} is {type(row).__name__}, expected an object of fields; "
                            "fix that row")
    return rows[:max_rows] if max_rows else rows


def _read_local(path: Path, key: str) -> list[dict[str, Any]]:
    if path.is_dir():
        raise UserError(f"{key}: {path} is a directory; point {key} at a .jsonl/.json/.csv/.parquet file")
    if not path.is_file():
        raise UserError(f"{key}: data file {path} not found; fix the path in {key}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig") or "[]")
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno} is not valid JSON: {json_detail(e, e.doc)}; fix it "
                            "(a .json file holds one list of objects; .jsonl holds one object per line)") from None
        return data if isinstance(data, list) else data.get("data", [data]) if isinstance(data, dict) else []
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise UserError(f"{key}: {path} is not a readable parquet file ({e}); re-export it") from None
    raise UserError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: drop an Excel BOM
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or None in row.values():  # more / fewer cells than header columns
                raise UserError(f"{path}: line {reader.line_num} does not have one cell per header column "
                                f"({reader.fieldnames}); fix that line (quote cells that hold commas)")
            rows.append(dict(row))  # cells stay text ("007", "1.10"): render converts only what a format spec needs
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: drop a BOM written by Windows tools
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            line = line.rstrip("\r\n")  # so the parser's position is on this line, not past its end
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n} is not valid JSON: {json_detail(e, line)}; "
                                "fix or remove that line") from None
    return rows


def json_detail(e: json.JSONDecodeError, text: str) -> str:
    """The parser's whole message, its column, and the text where it stopped (`text`: what was parsed)."""
    lines = text.splitlines()
    rest = lines[e.lineno - 1][e.colno - 1:] if e.lineno <= len(lines) else ""
    where = f"just before {rest[:24]!r}{'...' if len(rest) > 24 else ''}" if rest.strip() else "at the end of the line"
    msg = e.msg.removesuffix(" at")  # "Unterminated string starting at" ends where its position goes
    return f"{msg} at column {e.colno}, {where}"


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # a number as a CSV cell writes it
NUMBER_TYPES = set("bcdeEfFgGnoxX%")  # format types only numbers take ({price:.0f}, {qty:d}, {share:.0%})


def needs_number(spec: str) -> bool:
    """Whether a format spec ('.0f', ',', '>8') formats only numbers: a numeric type, or one that text refuses."""
    if spec and spec[-1] in NUMBER_TYPES:
        return True
    try:
        format("", spec)
    except ValueError:  # ',' or '=' and the like: no meaning for text
        return True
    return False


def as_numbers(template: str, row: dict[str, Any], where: str, key: str) -> dict[str, Any]:
    """`row` with the text cells that `template` formats as numbers converted ('7.50' -> 7.5, '007' -> 7): CSV cells
    are read as text and stay so elsewhere. A cell that is not a number is a one-line error naming it."""
    out = row
    for name, spec in _formatted_fields(template):
        value = row.get(name)
        if not isinstance(value, str) or not needs_number(spec):
            continue
        text = value.strip()
        if not text:
            raise UserError(f"{where}: column {name!r} is empty, and {key} {template!r} formats it as a number; "
                            "fill in that cell or remove the row")
        if not _NUMBER.match(text):
            raise UserError(f"{where}: column {name!r} is {value!r}, not a number, and {key} {template!r} formats it "
                            f"as a number ({{{name}:{spec}}}); fix that cell, or drop the format spec to keep it as text")
        number = int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
        out = {**out, name: number}
    return out


def _read_hub(spec: str, split: str, key: str = "data.train") -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(spec, split=split).to_list()
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        offline = "; offline: HF_HUB_OFFLINE is set, so only cached datasets load" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" else ""
        raise UserError(
            f"{key}: {spec} is not a local data file and could not be loaded from the hub "
            f"({str(e).splitlines()[0]}{offline}); check the path or dataset id"
        ) from None


# --------------------------------------------------------------------------------------------
# Rendering rows into (prompt, completion) / messages / text


def render(template: str, row: dict[str, Any], where: str, key: str = "template") -> str:
    """Fill `template` (config key `key`) from `row`; a missing or null field is an error, never "None"."""
    missing = [f for f in template_fields(template) if f not in row]
    if missing:
        raise UserError(f"{where}: {key} {template!r} needs field {missing[0]!r}, which the row lacks "
                        f"(it has {sorted(map(str, row))}); fix {key} or the data")
    null = [f for f in template_fields(template) if row[f] is None]
    if null:
        raise UserError(f"{where}: field {null[0]!r} (used by {key}) is null; fill it in or remove the row")
    try:
        return template.format(**as_numbers(template, row, where, key))
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {key} {template!r} cannot format this row ({e}); fix the row or {key}") from None


def _formatted_fields(template: str) -> list[tuple[str, str]]:
    """(field, format spec) for each placeholder of a str.format template ('{price:.0f}' -> ('price', '.0f'))."""
    import string

    return [(name, spec or "") for _, name, spec, _ in string.Formatter().parse(template) if name is not None]


def to_example(row: dict[str, Any], d: DataCfg, where: str) -> dict[str, Any]:
    """One raw row -> {"prompt", "completion"} | {"messages"} | {"text"}."""
    if d.format == "prompt_completion":
        return {"prompt": render(d.prompt, row, where, "data.prompt"),
                "completion": render(d.completion, row, where, "data.completion")}
    if d.format == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where}: alpaca rows need a text field {key!r}; row has {sorted(row)}")
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            has_input=", paired with an input that provides further context" if extra else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return {"prompt": prompt, "completion": row["output"]}
    if d.format == "messages":
        return {"messages": check_messages(row.get(d.messages_field), d.messages_field, where)}
    return {"text": render(d.text, row, where, "data.text")}


def check_messages(messages: Any, name: str, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field {name!r} must be a non-empty list of {{role, content}}; see data.messages_field")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {name}[{i}] must be an object with a text 'content'")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: {name}[{i}] has role {m.get('role')!r}; use one of {sorted(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: {name} has no assistant turn, so there is nothing to learn; "
                        "add the assistant's reply or remove the row")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --------------------------------------------------------------------------------------------
# Tokenizing with loss masks


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None  # prompt_completion/alpaca: what generation is fed
    truncated: bool = False


def cut_prompt(ids: list[int], budget: int) -> tuple[list[int], bool]:
    """Prompt tokens fitting `budget`: the head and the last quarter (the question) are kept, the middle goes."""
    if len(ids) <= budget:
        return ids, False
    tail = min(budget // 4, 64)
    return ids[: budget - tail] + (ids[-tail:] if tail else []), True


def completion_ids(tok, completion: str) -> list[int]:
    return tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def encode_prompt_completion(tok, prompt: str, completion: str, d: DataCfg, reserve: int) -> Encoded | str:
    """Tokens and labels (completion + EOS only); a string is the reason the row is dropped.

    A prompt longer than max_length - `reserve` is cut to exactly that (prompt_middle) or its row dropped
    (drop), whatever this row's completion: `reserve` is the same for every row (data.completion_budget).
    Cutting each prompt to fit its own completion would make the prompt's length tell the model how long
    the answer is (a price's digit count): a model that learns this scores well on the eval and fails on
    real, uncut prompts.
    """
    comp = completion_ids(tok, completion)
    full = tok(prompt)["input_ids"]
    if d.truncation == "keep_start":
        ids, labels = (full + comp)[: d.max_length], ([IGNORE] * len(full) + comp)[: d.max_length]
        if all(x == IGNORE for x in labels):
            return "prompt alone fills data.max_length, no completion tokens left"
        return Encoded(ids, labels, ids[: len(full)], truncated=len(full) + len(comp) > d.max_length)
    if len(comp) >= d.max_length:
        return "completion alone fills data.max_length"
    if d.truncation == "drop" and len(full) > d.max_length - reserve:
        return "longer than data.max_length (data.truncation=drop)"
    p, cut = cut_prompt(full, d.max_length - reserve)  # under drop the prompt already fits: never cut
    ids, labels = (p + comp)[: d.max_length], ([IGNORE] * len(p) + comp)[: d.max_length]
    return Encoded(ids, labels, p, truncated=cut or len(p) + len(comp) > d.max_length)


def resolve_reserve(tok, examples: list[dict[str, Any]], d: DataCfg) -> int:
    """Tokens every cut prompt leaves for its completion: data.completion_budget, or the longest
    completion (+ EOS) among `examples`, so none of them is cut, but at most half of data.max_length,
    so one very long answer cannot squeeze every prompt (a longer answer loses its end instead)."""
    if d.completion_budget is not None:
        return d.completion_budget
    longest = max((len(completion_ids(tok, ex["completion"])) for ex in examples if "completion" in ex), default=1)
    return min(longest, d.max_length // 2)


def encode_text(tok, text: str, d: DataCfg) -> Encoded | str:
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    if len(ids) > d.max_length and d.truncation == "drop":
        return "longer than data.max_length (data.truncation=drop)"
    cut = ids[: d.max_length]
    return Encoded(cut, list(cut), truncated=len(ids) > d.max_length)


def encode_messages(tok, messages: list[dict[str, str]], d: DataCfg, where: str) -> Encoded | str:
    """Render the conversation; only assistant turns carry labels.

    Each assistant span is found by rendering the conversation up to the turn (with the generation
    prompt) and through it: the tokens in between are the assistant's. This works with any chat
    template whose renderings are prefixes of each other, without {% generation %} markers; check_prefixes
    refuses, in one line, a template that is not (one that rewrites earlier turns, as some drop old reasoning).
    """
    full = chat_ids(tok, messages, False, where)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_ids(tok, messages[:i], True, where) if i else []
        through = chat_ids(tok, messages[: i + 1], False, where)
        check_prefixes(tok, [before, through, full], i, where)
        labels[len(before):len(through)] = full[len(before):len(through)]
    if len(full) > d.max_length and d.truncation == "drop":
        return "longer than data.max_length (data.truncation=drop)"
    ids, labels = full[: d.max_length], labels[: d.max_length]
    if all(x == IGNORE for x in labels):
        return "no assistant tokens left within data.max_length"
    return Encoded(ids, labels, truncated=len(full) > d.max_length)


def check_prefixes(tok, renderings: list[list[int]], turn: int, where: str) -> None:
    """Each rendering (the conversation before assistant turn `turn` with the generation prompt, through that
    turn, the whole) must start with the one before it, or the assistant's tokens cannot be found by position."""
    for shorter, longer in zip(renderings, renderings[1:]):
        if longer[: len(shorter)] != shorter:
            name = getattr(tok, "name_or_path", "") or "this tokenizer"
            raise UserError(f"{where}: the chat template of {name} renders the conversation up to message {turn + 1} "
                            "(assistant) differently from how it renders it inside the longer conversation, so the "
                            "assistant tokens cannot be located; use a chat template whose renderings of a "
                            "conversation are prefixes of each other, or data.format: prompt_completion")


def chat_ids(tok, messages, add_generation_prompt: bool, where: str) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{where}: data.format=messages needs a tokenizer with a chat template; this one has none")
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                   return_dict=False)


def encode(tok, example: dict[str, Any], d: DataCfg, where: str, reserve: int) -> Encoded | str:
    if "prompt" in example:
        return encode_prompt_completion(tok, example["prompt"], example["completion"], d, reserve)
    if "messages" in example:
        return encode_messages(tok, example["messages"], d, where)
    return encode_text(tok, example["text"], d)


# --------------------------------------------------------------------------------------------
# Splits


@dataclass
class Split:
    """One tokenized split plus what happened to its rows."""

    name: str
    source: str
    examples: list[dict[str, Any]] = field(default_factory=list)  # rendered prompt/completion/...
    encoded: list[Encoded] = field(default_factory=list)
    row_ids: list[int] = field(default_factory=list)  # 1-based source row of each kept example
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    reserve: int = 0  # tokens each cut prompt left for its completion (resolve_reserve)
    cuts_prompts: bool = False  # prompt_completion rows under data.truncation=prompt_middle
    note: str = ""  # how the rows were chosen, when not all of them (data.max_rows)

    def to_dataset(self):
        import datasets

        return datasets.Dataset.from_dict(
            {"input_ids": [e.input_ids for e in self.encoded], "labels": [e.labels for e in self.encoded]}
        )

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        cut = f" (prompts cut to leave {self.reserve} tokens for the answer)" if self.truncated and self.cuts_prompts else ""
        chosen = f" ({self.note})" if self.note else ""
        return (f"{self.name}: {len(self.encoded)} rows from {self.source}{chosen}; "
                f"{self.truncated} truncated to data.max_length{cut}; dropped: {drops}")


def build_split(name: str, source: str, rows: list[dict[str, Any]], tok, d: DataCfg,
                row_numbers: list[int] | None = None) -> Split:
    split = Split(name, source)
    numbers = row_numbers or list(range(1, len(rows) + 1))
    examples = [to_example(row, d, f"{source}: row {n}") for row, n in zip(rows, numbers)]
    split.reserve = resolve_reserve(tok, examples, d)
    split.cuts_prompts = d.truncation == "prompt_middle" and any("completion" in ex for ex in examples)
    for row, n, example in zip(rows, numbers, examples):
        enc = encode(tok, example, d, f"{source}: row {n}", split.reserve)
        if isinstance(enc, str):
            split.dropped[enc] = split.dropped.get(enc, 0) + 1
            continue
        split.examples.append({**example, "_row": row})
        split.encoded.append(enc)
        split.row_ids.append(n)
        split.truncated += enc.truncated
    if not split.encoded:
        raise UserError(f"{source}: all {len(rows)} rows were dropped ({split.summary()}); "
                        "raise data.max_length or shorten the rows")
    return split


def sample_indices(n: int, limit: int | None, how: str, seed: int) -> list[int]:
    """0-based indices of at most `limit` of `n` rows (None = all), in file order: data.max_rows and
    eval.limit both choose rows with this. how "random": the first `limit` of one shuffle seeded by
    `seed` (the same rows on every resume and eval; a smaller limit gives a subset of a larger one);
    "first": the head of the file."""
    if limit is None or limit >= n:
        return list(range(n))
    if how == "first":
        return list(range(limit))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:limit])


def sample_rows(rows: list[dict[str, Any]], limit: int | None, how: str, seed: int) -> tuple[list[int], str]:
    """sample_indices of `rows`, and a note saying which (empty when all are kept)."""
    n = len(rows)
    keep = sample_indices(n, limit, how, seed)
    if len(keep) == n:
        return keep, ""
    if how == "first":
        return keep, f"data.max_rows: the first {limit} of {n} rows"
    return keep, f"data.max_rows: a random sample of {limit} of {n} rows, seed {seed}"


def select_rows(cfg: Config) -> dict[str, Any]:
    """Raw train/eval rows with their 1-based source row numbers (eval from data.eval or eval_fraction).
    data.max_rows caps the train rows (as data.sample says) before any eval_fraction is held out."""
    d = cfg.data
    all_rows = read_rows(d.train, d.split, key="data.train")
    keep, note = sample_rows(all_rows, d.max_rows, d.sample, cfg.run.seed)
    train_rows = [all_rows[i] for i in keep]
    sel: dict[str, Any] = {"train": train_rows, "train_ids": [i + 1 for i in keep], "train_note": note,
                           "eval": None, "eval_ids": None, "eval_source": d.eval}
    if d.eval is not None:
        eval_rows = read_rows(d.eval, d.eval_split if d.eval == d.train else d.split, key="data.eval")
        sel.update(eval=eval_rows, eval_ids=list(range(1, len(eval_rows) + 1)))
    elif d.eval_fraction > 0:
        order = list(range(len(train_rows)))
        random.Random(cfg.run.seed).shuffle(order)  # seeded: the same rows are held out on every resume and eval
        held = set(order[: max(1, round(len(order) * d.eval_fraction))])  # round: 100*0.29 is 28.999...
        if len(held) == len(train_rows):
            raise UserError(f"data.eval_fraction: holding out {len(held)} of the {len(train_rows)} rows of {d.train} "
                            "leaves none to train on; add rows, or give a separate data.eval file")
        ids = sel["train_ids"]
        sel.update(eval=[train_rows[i] for i in sorted(held)], eval_ids=[ids[i] for i in sorted(held)],
                   train=[r for i, r in enumerate(train_rows) if i not in held],
                   train_ids=[n for i, n in enumerate(ids) if i not in held],
                   eval_source=f"{d.train} (held-out {d.eval_fraction:.0%})")
    return sel


def load_splits(cfg: Config, tok, train: bool = True) -> tuple[Split | None, Split | None]:
    """Tokenized train and eval splits (eval is None when none is configured).

    The train split's `reserve` is the resolved data.completion_budget (None -> the longest training
    completion); `cfg` is left as validated. with_resolved_budget(cfg, train_split) is the config the run
    records (config.yaml, the adapter's), so `train eval` cuts prompts exactly like training did.
    """
    sel = select_rows(cfg)
    train_split = evals = None
    has_answers = cfg.data.format in ("prompt_completion", "alpaca")  # the formats whose prompts get cut
    if train:
        train_split = build_split("train", cfg.data.train, sel["train"], tok, cfg.data, sel["train_ids"])
        train_split.note = sel["train_note"]
        log.info(train_split.summary())
    if sel["eval"] is not None:
        if train_split is not None and has_answers:  # eval rows are cut exactly like training rows
            cfg = with_resolved_budget(cfg, train_split)
        if not train and cfg.data.completion_budget is None and has_answers:
            log.warning("this run's config has no data.completion_budget (trained before it existed): cut eval "
                        "prompts leave room for the longest eval answer, which may differ from training")
        evals = build_split("eval", sel["eval_source"], sel["eval"], tok, cfg.data, sel["eval_ids"])
        log.info(evals.summary())
    return train_split, evals


def with_resolved_budget(cfg: Config, train_split: Split) -> Config:
    """A copy of `cfg` whose data.completion_budget is the one training resolved (train_split.reserve), for the
    formats whose prompts get cut; `cfg` itself is not changed."""
    if cfg.data.format not in ("prompt_completion", "alpaca") or cfg.data.completion_budget == train_split.reserve:
        return cfg
    resolved = copy.deepcopy(cfg)
    resolved.data.completion_budget = train_split.reserve
    return resolved


def load_splits_eval_only(cfg: Config, tok) -> tuple[None, Split | None]:
    return load_splits(cfg, tok, train=False)


# --------------------------------------------------------------------------------------------
# The data a fit read: hashed beside config.yaml, so `train eval` knows when a file changed since

DATA_RECORD = "data_record.json"  # in the run directory, beside config.yaml
HASH_CHUNK = 1 << 20  # bytes read at a time: a multi-GB file hashes in constant memory


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_record(cfg: Config) -> dict[str, Any]:
    """{"data.train": {"path", "sha256"}, "data.eval": ...} for the files the config reads; sha256 None for a
    hub dataset (its revision is the hub's to record) or a path that is not a file."""
    record = {}
    for key in ("data.train", "data.eval"):
        spec = getattr(cfg.data, key.split(".")[1])
        if spec is None:
            continue
        path = Path(spec).expanduser()
        record[key] = {"path": spec, "sha256": file_sha256(path) if path.is_file() else None}
    return record


def write_data_record(cfg: Config, run: Path) -> None:
    """What `train fit` calls once the run directory is ready: the data files' hashes, beside config.yaml."""
    from train.checkpoints import write_atomic

    write_atomic(Path(run) / DATA_RECORD, json.dumps(data_record(cfg), indent=1) + "\n")


def eval_reads(cfg: Config) -> dict[str, str]:
    """Files `train eval` reads under `cfg` -> "rows" (the rows it scores) or "baseline" (the train answers only)."""
    d = cfg.data
    held_out = d.eval is None and d.eval_fraction > 0
    uses = {d.train: "rows" if held_out else "baseline"}
    if d.eval is not None:
        uses[d.eval] = "rows"
    return uses


def check_data_record(cfg: Config, adapter_dir: Path) -> None:
    """Before `train eval` scores anything: refuse (UserError) when a file whose rows it scores changed since fit
    recorded it, unless eval.on_data_change is warn; warn when only the baseline's train file changed, or when
    the run has no record. A file given with --data, a hub dataset and a missing file are not checked here."""
    runs = (adapter_dir, adapter_dir.parent, *([adapter_dir.parent.parent] if adapter_dir.parent.name == "checkpoints"
                                             else []))  # RUN, RUN/adapter, RUN/checkpoints/checkpoint-N
    found = [p / DATA_RECORD for p in runs if (p / DATA_RECORD).is_file()]
    if not found:
        log.warning("%s: no %s (fit before data files were recorded): cannot check that the eval data is what "
                    "fit read", adapter_dir, DATA_RECORD)
        return
    record = {e["path"]: e["sha256"] for e in json.loads(found[0].read_text()).values()}
    for spec, use in eval_reads(cfg).items():
        path = Path(spec).expanduser()
        if record.get(spec) is None or not path.is_file() or file_sha256(path) == record[spec]:
            continue
        what = ("the eval rows it scores are no longer those fit held out or evaluated, and may include rows the "
                "adapter trained on" if use == "rows" else "the constant baseline's train answers are re-read from it")
        msg = f"{spec} changed since this run was fit (sha256 {record[spec][:12]} recorded in {found[0]}): {what}"
        if use == "rows" and cfg.eval.on_data_change == "refuse":
            raise UserError(f"{msg}; restore the file, evaluate other data with --data FILE, or accept the change "
                            "with --set eval.on_data_change=warn")
        log.warning("%s", msg)
