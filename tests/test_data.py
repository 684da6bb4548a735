"""Data: loss masks, truncation, formats, split bookkeeping, row selection and file readers.

Uses the builtin tiny tokenizer: byte-level with no merges, so every ASCII character is exactly
one token, `tok(text)` prepends BOS, and the chat special tokens (<|user|>, <|end|>, ...) are one
token each. That makes every expected length and mask below exact.
"""

import json
import re

import pytest

from conftest import small_config
from train.config import DataCfg
from train.data import (IGNORE, build_split, encode_messages, encode_prompt_completion, encode_text, read_rows,
                        select_rows, to_example)
from train.errors import UserError


def ids_of(tok, text):
    """Token ids of `text` with no BOS (special tokens in the text are recognised)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled(enc):
    return [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE]


def cfg(**kw):
    return DataCfg(train="rows.jsonl", **kw)


# --------------------------------------------------------------------------------------------
# prompt_completion


def test_tiny_tokenizer_is_one_token_per_character(tiny_tok):
    assert tiny_tok("Price is $")["input_ids"] == [tiny_tok.bos_token_id] + ids_of(tiny_tok, "Price is $")
    assert len(ids_of(tiny_tok, "Price is $")) == len("Price is $")
    assert len(ids_of(tiny_tok, "<|user|>hi<|end|>")) == 4


def test_prompt_completion_labels_only_completion_and_eos(tiny_tok):
    prompt, completion = "How much?\n\nA chair.\n\nPrice is $", "42.00"
    enc = encode_prompt_completion(tiny_tok, prompt, completion, cfg(max_length=128), reserve=len(completion) + 1)
    n_prompt = 1 + len(prompt)  # BOS + one token per character
    assert len(enc.input_ids) == len(enc.labels) == n_prompt + len(completion) + 1
    assert enc.input_ids[0] == tiny_tok.bos_token_id
    assert enc.input_ids[-1] == tiny_tok.eos_token_id
    assert enc.labels[:n_prompt] == [IGNORE] * n_prompt  # -100 exactly on the prompt ...
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]  # ... and every other token carries its own id
    assert IGNORE not in enc.labels[n_prompt:]
    assert tiny_tok.decode(labelled(enc)) == completion + tiny_tok.eos_token
    assert enc.prompt_ids == enc.input_ids[:n_prompt]  # what generation is fed
    assert tiny_tok.decode(enc.prompt_ids, skip_special_tokens=True) == prompt
    assert enc.truncated is False


def test_prompt_completion_exactly_max_length_is_not_truncated(tiny_tok):
    prompt, completion = "p" * 20, "c" * 10
    enc = encode_prompt_completion(tiny_tok, prompt, completion, cfg(max_length=1 + 20 + 10 + 1), reserve=11)
    assert len(enc.input_ids) == 32
    assert enc.truncated is False
    assert tiny_tok.decode(labelled(enc)) == completion + tiny_tok.eos_token


LONG_PROMPT = "How much does this cost?\n\n" + "A very long product description. " * 20 + "\n\nPrice is $"


def test_prompt_middle_keeps_head_question_and_whole_completion(tiny_tok):
    completion = "123.00"
    enc = encode_prompt_completion(tiny_tok, LONG_PROMPT, completion, cfg(max_length=64, truncation="prompt_middle"),
                                   reserve=len(completion) + 1)
    assert len(enc.input_ids) == len(enc.labels) == 64
    assert enc.truncated is True
    assert tiny_tok.decode(labelled(enc)) == completion + tiny_tok.eos_token  # the answer is never cut
    assert len(enc.prompt_ids) == 64 - len(completion) - 1
    assert enc.labels[: len(enc.prompt_ids)] == [IGNORE] * len(enc.prompt_ids)
    kept = tiny_tok.decode(enc.prompt_ids, skip_special_tokens=True)
    assert enc.prompt_ids[0] == tiny_tok.bos_token_id
    assert kept.startswith("How much does this cost?")  # the head
    assert kept.endswith("\n\nPrice is $")  # the question right before the answer
    assert len(kept) < len(LONG_PROMPT)  # the middle went


def test_keep_start_cuts_the_end(tiny_tok):
    prompt, completion = "p" * 58, "123.00"  # BOS + 58 + 6 + EOS = 66 > 64
    enc = encode_prompt_completion(tiny_tok, prompt, completion, cfg(max_length=64, truncation="keep_start"), reserve=7)
    full = tiny_tok(prompt)["input_ids"] + ids_of(tiny_tok, completion) + [tiny_tok.eos_token_id]
    assert enc.input_ids == full[:64]
    assert enc.truncated is True
    assert tiny_tok.decode(labelled(enc)) == completion[: 64 - 59]  # only the first 5 completion tokens
    assert tiny_tok.eos_token_id not in enc.input_ids


def test_keep_start_drops_a_row_whose_prompt_fills_max_length(tiny_tok):
    why = encode_prompt_completion(tiny_tok, LONG_PROMPT, "1.00", cfg(max_length=64, truncation="keep_start"), reserve=5)
    assert isinstance(why, str) and "max_length" in why


def test_drop_keeps_or_drops_on_the_prompt_alone_and_never_cuts_it(tiny_tok):
    """Under drop, whether a row stays must not depend on its own answer, and a kept prompt is never cut."""
    d = cfg(max_length=64, truncation="drop")
    prompt = "p" * 50  # BOS + 50 tokens: fits the 64 - 10 room
    short, long_ = (encode_prompt_completion(tiny_tok, prompt, c, d, reserve=10) for c in ("1", "x" * 20))
    assert short.prompt_ids == long_.prompt_ids == tiny_tok(prompt)["input_ids"] and not short.truncated
    assert long_.truncated and len(long_.input_ids) == 64  # its answer lost its end, the prompt nothing
    too_long = "p" * 60  # BOS + 60 > 64 - 10, whatever the answer
    assert all(isinstance(encode_prompt_completion(tiny_tok, too_long, c, d, reserve=10), str) for c in ("1", "12"))


def test_drop_returns_a_reason(tiny_tok):
    why = encode_prompt_completion(tiny_tok, LONG_PROMPT, "123.00", cfg(max_length=64, truncation="drop"), reserve=7)
    assert why == "longer than data.max_length (data.truncation=drop)"
    kept = encode_prompt_completion(tiny_tok, "short", "1.00", cfg(max_length=64, truncation="drop"), reserve=5)
    assert not isinstance(kept, str) and kept.truncated is False


def test_a_cut_prompt_never_reveals_its_answers_length(tiny_tok):
    """Regression: prompts were cut to fit their own completion, so a cut prompt's length told the model
    the price's digit count (stories260K 'learned' exact price bands from it). Same prompt, answers of
    different lengths, one shared reserve: identical prompt tokens."""
    d = cfg(max_length=64, truncation="prompt_middle")
    cut = [encode_prompt_completion(tiny_tok, LONG_PROMPT, c, d, reserve=8) for c in ("1.00", "12.00", "123.00")]
    assert cut[0].prompt_ids == cut[1].prompt_ids == cut[2].prompt_ids
    assert len(cut[0].prompt_ids) == 64 - 8 and all(e.truncated for e in cut)
    assert [tiny_tok.decode(labelled(e)) for e in cut] == [c + tiny_tok.eos_token for c in ("1.00", "12.00", "123.00")]


def test_split_reserves_its_longest_completion(tiny_tok):
    rows = [{"prompt": LONG_PROMPT, "completion": c} for c in ("1.00", "123.00", "12.00")]
    split = build_split("train", "rows.jsonl", rows, tiny_tok, cfg(max_length=64))
    assert split.reserve == len("123.00") + 1
    assert len({len(e.prompt_ids) for e in split.encoded}) == 1  # every cut prompt has the same length
    small = build_split("train", "rows.jsonl", rows, tiny_tok, cfg(max_length=64, completion_budget=5))
    assert small.reserve == 5 and small.encoded[1].truncated  # "123.00" + EOS loses its end, the prompt does not shrink
    assert len(small.encoded[1].input_ids) == 64 and len(small.encoded[1].prompt_ids) == 64 - 5
    capped = build_split("train", "rows.jsonl", [*rows, {"prompt": "Q", "completion": "x" * 50}], tiny_tok,
                         cfg(max_length=64))
    assert capped.reserve == 32  # one long answer does not squeeze every prompt below half of max_length


def test_eval_rows_are_cut_with_the_training_reserve_which_the_config_records(tiny_tok, tmp_path):
    from conftest import small_config

    from train.data import load_splits, with_resolved_budget

    cfg_ = small_config(tmp_path / "run", data={"max_length": 48})
    train_split, eval_split = load_splits(cfg_, tiny_tok)
    assert cfg_.data.completion_budget is None  # the validated config is not changed
    recorded = with_resolved_budget(cfg_, train_split).data.completion_budget  # what config.yaml records
    assert recorded == train_split.reserve == eval_split.reserve > 1
    assert train_split.truncated and eval_split.truncated  # the demo prompts do not fit 48 tokens
    assert {len(e.prompt_ids) for e in eval_split.encoded if e.truncated} == {48 - train_split.reserve}


@pytest.mark.parametrize("truncation", ["prompt_middle", "drop"])
def test_completion_longer_than_max_length_is_dropped(tiny_tok, truncation):
    why = encode_prompt_completion(tiny_tok, "Q", "x" * 80, cfg(max_length=64, truncation=truncation), reserve=32)
    assert isinstance(why, str) and "max_length" in why


# --------------------------------------------------------------------------------------------
# messages


def expected_chat(tok, segments):
    """(ids, labels) from [(text, is_assistant)]: assistant text carries its own ids, the rest -100."""
    ids, labels = [], []
    for text, trained in segments:
        t = ids_of(tok, text)
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    return ids, labels


def test_messages_label_only_the_assistant_turn(tiny_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello"}]
    enc = encode_messages(tiny_tok, msgs, cfg(format="messages", max_length=128), "test")
    ids, labels = expected_chat(tiny_tok, [("<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>", False),
                                           ("Hello<|end|>", True)])
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert tiny_tok.decode(labelled(enc)) == "Hello<|end|>"  # the <|end|> closing the turn is learned
    assert enc.truncated is False


def test_messages_multi_turn_labels_both_assistant_turns(tiny_tok):
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    enc = encode_messages(tiny_tok, msgs, cfg(format="messages", max_length=128), "test")
    ids, labels = expected_chat(tiny_tok, [("<|user|>Q1<|end|><|assistant|>", False), ("A1<|end|>", True),
                                           ("<|user|>Q2<|end|><|assistant|>", False), ("A2<|end|>", True)])
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert tiny_tok.decode(labelled(enc)) == "A1<|end|>A2<|end|>"
    user_tokens = set(ids_of(tiny_tok, "<|user|>Q"))  # tokens that only occur in user turns
    assert all(lab == IGNORE for t, lab in zip(enc.input_ids, enc.labels) if t in user_tokens)


LAST_TURN_MARKED = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and loop.last %}[final]"
                    "{% endif %}{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(tiny_tok):
    """A chat template that renders a turn differently once more turns follow (here: a mark on the last assistant
    turn, as templates that drop old reasoning do) would shift the labels onto the wrong tokens: refused."""
    tiny_tok.chat_template = LAST_TURN_MARKED
    one = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    enc = encode_messages(tiny_tok, one, cfg(format="messages", max_length=128), "t")  # one turn: prefixes hold
    assert tiny_tok.decode(labelled(enc)) == "[final]A1<|end|>"
    two = one + [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    with pytest.raises(UserError) as e:
        encode_messages(tiny_tok, two, cfg(format="messages", max_length=128), "chats.jsonl: row 3")
    msg = str(e.value)
    assert msg.startswith(f"chats.jsonl: row 3: the chat template of {tiny_tok.name_or_path} renders the "
                          "conversation up to message 2 (assistant) differently")
    assert msg.endswith("or data.format: prompt_completion") and "\n" not in msg
    # a generation prompt that is not how the template opens an assistant turn is refused the same way
    tiny_tok.chat_template = LAST_TURN_MARKED.replace("{% if add_generation_prompt %}<|assistant|>",
                                                      "{% if add_generation_prompt %}<|assistant|>\n")
    with pytest.raises(UserError, match=r"^t: the chat template .* up to message 2 \(assistant\)"):
        encode_messages(tiny_tok, one, cfg(format="messages", max_length=128), "t")


def test_messages_drop_and_truncate(tiny_tok):
    msgs = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 40}]
    assert isinstance(encode_messages(tiny_tok, msgs, cfg(format="messages", max_length=32, truncation="drop"), "t"),
                      str)
    # the assistant turn starts after position 32: nothing left to learn
    why = encode_messages(tiny_tok, msgs, cfg(format="messages", max_length=32), "t")
    assert why == "no assistant tokens left within data.max_length"
    cut = encode_messages(tiny_tok, msgs, cfg(format="messages", max_length=60), "t")
    assert len(cut.input_ids) == 60 and cut.truncated is True
    assert tiny_tok.decode(labelled(cut)) == "y" * (60 - 1 - 40 - 1 - 1)


def test_messages_rows_are_checked(tiny_tok):
    d = cfg(format="messages")
    with pytest.raises(UserError, match="no assistant turn"):
        to_example({"messages": [{"role": "user", "content": "hi"}]}, d, "rows.jsonl: row 1")
    with pytest.raises(UserError, match="role 'bot'"):
        to_example({"messages": [{"role": "bot", "content": "hi"}]}, d, "rows.jsonl: row 1")
    ex = to_example({"conv": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]},
                    cfg(format="messages", messages_field="conv"), "w")
    assert ex == {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


# --------------------------------------------------------------------------------------------
# text and alpaca


def test_text_labels_every_token_including_eos(tiny_tok):
    enc = encode_text(tiny_tok, "hello world", cfg(format="text", max_length=64))
    assert enc.input_ids == tiny_tok("hello world")["input_ids"] + [tiny_tok.eos_token_id]
    assert len(enc.input_ids) == 1 + 11 + 1
    assert enc.labels == enc.input_ids
    assert enc.truncated is False


def test_text_truncation(tiny_tok):
    cut = encode_text(tiny_tok, "z" * 100, cfg(format="text", max_length=16))
    assert len(cut.input_ids) == 16 and cut.labels == cut.input_ids and cut.truncated is True
    why = encode_text(tiny_tok, "z" * 100, cfg(format="text", max_length=16, truncation="drop"))
    assert isinstance(why, str) and "max_length" in why


def test_text_template_renders_fields():
    ex = to_example({"title": "Chair", "price": 12.6}, cfg(format="text", text="{title} costs ${price:.0f}"), "w")
    assert ex == {"text": "Chair costs $13"}


def test_alpaca_with_input():
    ex = to_example({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, cfg(format="alpaca"), "w")
    assert ex["completion"] == "5"
    assert "### Instruction:\nAdd the numbers.\n\n" in ex["prompt"]
    assert "### Input:\n2 and 3\n\n" in ex["prompt"]
    assert "paired with an input" in ex["prompt"]
    assert ex["prompt"].endswith("### Response:\n")


@pytest.mark.parametrize("row", [{"instruction": "Say hi.", "input": "", "output": "hi"},
                                 {"instruction": "Say hi.", "output": "hi"},
                                 {"instruction": "Say hi.", "input": None, "output": "hi"}])
def test_alpaca_without_input_has_no_input_block(row):
    ex = to_example(row, cfg(format="alpaca"), "w")
    assert ex["completion"] == "hi"
    assert "### Instruction:\nSay hi.\n\n### Response:\n" in ex["prompt"]
    assert "### Input" not in ex["prompt"]
    assert "paired with an input" not in ex["prompt"]


def test_alpaca_needs_instruction_and_output():
    with pytest.raises(UserError, match="'output'"):
        to_example({"instruction": "x"}, cfg(format="alpaca"), "rows.jsonl: row 3")


def test_prompt_completion_template_errors_name_the_row():
    d = cfg(prompt="{title}", completion="{price:.0f}")
    with pytest.raises(UserError, match=re.escape("row 4: data.prompt '{title}' needs field 'title'")):
        to_example({"name": "x", "price": 1}, d, "rows.jsonl: row 4")
    with pytest.raises(UserError, match="'price' .* is null"):
        to_example({"title": "x", "price": None}, d, "rows.jsonl: row 4")


# --------------------------------------------------------------------------------------------
# build_split


ROWS = [
    {"q": "short", "a": "1"},  # kept as is
    {"q": "long " * 30, "a": "2"},  # prompt cut in the middle
    {"q": "x", "a": "9" * 40},  # completion alone is longer than max_length
    {"q": "y", "a": "8" * 40},  # again
]


def test_build_split_counts_truncated_and_drop_reasons(tiny_tok):
    d = cfg(prompt="{q}", completion="{a}", max_length=32)
    split = build_split("train", "rows.jsonl", ROWS, tiny_tok, d, row_numbers=[11, 12, 13, 14])
    assert len(split.encoded) == 2
    assert split.row_ids == [11, 12]  # source row numbers, not positions
    assert split.truncated == 1
    assert split.dropped == {"completion alone fills data.max_length": 2}
    assert [e["completion"] for e in split.examples] == ["1", "2"]
    assert split.examples[1]["_row"] is ROWS[1]
    assert "2 rows from rows.jsonl; 1 truncated" in split.summary()
    assert "2 completion alone fills data.max_length" in split.summary()
    ds = split.to_dataset()
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 2


def test_build_split_counts_each_reason_separately(tiny_tok):
    d = cfg(prompt="{q}", completion="{a}", max_length=32, truncation="drop")
    split = build_split("train", "rows.jsonl", ROWS, tiny_tok, d)
    assert split.row_ids == [1]
    assert split.truncated == 0
    assert split.dropped == {"longer than data.max_length (data.truncation=drop)": 1,
                             "completion alone fills data.max_length": 2}


def test_build_split_all_dropped_is_a_user_error(tiny_tok):
    d = cfg(prompt="{q}", completion="{a}", max_length=32)
    with pytest.raises(UserError, match="all 2 rows were dropped"):
        build_split("train", "rows.jsonl", ROWS[2:], tiny_tok, d)


# --------------------------------------------------------------------------------------------
# select_rows


def numbered_rows(tmp_path, n):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(1, n + 1)))
    return path


def selection(tmp_path, n=50, seed=7, **data):
    config = small_config(tmp_path / "run", run={"seed": seed},
                          data={"train": str(numbered_rows(tmp_path, n)), "prompt": "{prompt}",
                                "completion": "{completion}", "max_rows": None, **data})
    return select_rows(config)


def test_eval_fraction_holds_out_disjoint_rows_with_source_ids(tmp_path):
    sel = selection(tmp_path, eval_fraction=0.2)
    assert len(sel["eval"]) == len(sel["eval_ids"]) == 10
    assert len(sel["train"]) == len(sel["train_ids"]) == 40
    assert not set(sel["train_ids"]) & set(sel["eval_ids"])
    assert sorted(sel["train_ids"] + sel["eval_ids"]) == list(range(1, 51))  # 1-based source rows
    for rows, ids in ((sel["train"], sel["train_ids"]), (sel["eval"], sel["eval_ids"])):
        assert [r["prompt"] for r in rows] == [f"p{i}" for i in ids]
    assert sel["eval_ids"] == sorted(sel["eval_ids"])
    assert "held-out 20%" in sel["eval_source"]


def test_eval_fraction_is_deterministic_per_seed(tmp_path):
    a = selection(tmp_path, seed=7, eval_fraction=0.2)
    b = selection(tmp_path, seed=7, eval_fraction=0.2)
    c = selection(tmp_path, seed=8, eval_fraction=0.2)
    assert a["eval_ids"] == b["eval_ids"] and a["train_ids"] == b["train_ids"]
    assert a["eval_ids"] != c["eval_ids"]


def test_eval_fraction_holds_out_at_least_one_row(tmp_path):
    sel = selection(tmp_path, n=10, eval_fraction=0.01)
    assert len(sel["eval_ids"]) == 1 and len(sel["train_ids"]) == 9


def test_no_eval_configured(tmp_path):
    sel = selection(tmp_path, n=5, eval_fraction=0.0)
    assert sel["eval"] is None and sel["eval_ids"] is None
    assert sel["train_ids"] == [1, 2, 3, 4, 5]


def test_max_rows_caps_before_the_split(tmp_path):
    capped = selection(tmp_path, max_rows=10, eval_fraction=0.0)
    sel = selection(tmp_path, max_rows=10, eval_fraction=0.2)
    assert len(sel["train"]) + len(sel["eval"]) == 10
    assert sorted(sel["train_ids"] + sel["eval_ids"]) == capped["train_ids"]  # held out of the 10 sampled rows
    for rows, ids in ((sel["train"], sel["train_ids"]), (sel["eval"], sel["eval_ids"])):
        assert [r["prompt"] for r in rows] == [f"p{i}" for i in ids]  # ids are source rows, not positions


def test_max_rows_is_a_seeded_random_sample_in_file_order(tmp_path):
    """data.sample: random (the default): not the file's head; the same rows for a seed, in file order,
    and a smaller max_rows picks a subset of a larger one's rows."""
    a = selection(tmp_path, max_rows=10, seed=7, eval_fraction=0.0)
    assert a["train_ids"] != list(range(1, 11))
    assert a["train_ids"] == sorted(a["train_ids"]) and len(set(a["train_ids"])) == 10
    assert [r["prompt"] for r in a["train"]] == [f"p{i}" for i in a["train_ids"]]
    again = {seed: selection(tmp_path, max_rows=10, seed=seed, eval_fraction=0.0)["train_ids"] for seed in (7, 8)}
    assert again[7] == a["train_ids"] and again[8] != a["train_ids"]
    assert set(selection(tmp_path, max_rows=5, seed=7, eval_fraction=0.0)["train_ids"]) <= set(a["train_ids"])
    assert "a random sample of 10 of 50 rows, seed 7" in a["train_note"]


def test_max_rows_first_takes_the_head(tmp_path):
    sel = selection(tmp_path, max_rows=10, sample="first", eval_fraction=0.0)
    assert sel["train_ids"] == list(range(1, 11))
    assert [r["prompt"] for r in sel["train"]] == [f"p{i}" for i in range(1, 11)]
    assert "the first 10 of 50 rows" in sel["train_note"]


def test_max_rows_at_or_above_the_row_count_keeps_every_row(tmp_path):
    sel = selection(tmp_path, n=5, max_rows=5, eval_fraction=0.0)
    assert sel["train_ids"] == [1, 2, 3, 4, 5] and sel["train_note"] == ""


def test_separate_eval_file(tmp_path):
    ev = tmp_path / "eval.jsonl"
    ev.write_text('{"prompt": "e1", "completion": "x"}\n{"prompt": "e2", "completion": "y"}\n')
    sel = selection(tmp_path, n=5, eval=str(ev), eval_fraction=0.0, max_rows=3, sample="first")
    assert sel["train_ids"] == [1, 2, 3]
    assert sel["eval_ids"] == [1, 2]  # max_rows caps train only
    assert sel["eval_source"] == str(ev)


def test_eval_fraction_is_not_floored_by_float_error(tmp_path):
    sel = selection(tmp_path, n=100, eval_fraction=0.29)
    assert len(sel["eval_ids"]) == 29


# --------------------------------------------------------------------------------------------
# read_rows


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n\n', encoding="utf-8")
    assert read_rows(str(path)) == [{"a": 1}, {"a": 2}]


def test_jsonl_bad_line_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not valid JSON: Expecting value at column 7, at the end of the line"):
        read_rows(str(path))


def test_jsonl_error_detail_is_whole(tmp_path):
    """json's "Unterminated string starting at" ends where its position goes: the message completes it."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": "no end}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_rows(str(path))
    assert f"{path}: line 2 is not valid JSON: Unterminated string starting at column 7, just before " \
           "'\"no end}'" in str(e.value)


def test_json_file_error_names_line_and_column(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[{"a": 1},\n {"a": 2,}]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"r.json: line 2 is not valid JSON: Expecting property name enclosed in "
                                        r"double quotes at column 10, just before '}]'"):
        read_rows(str(path))


def test_empty_cell_under_a_number_format_is_named(tmp_path):
    d = cfg(prompt="{title}", completion="{price:.0f}.00")
    with pytest.raises(UserError) as e:
        to_example({"title": "Desk", "price": ""}, d, "r.csv: row 2")
    assert str(e.value) == ("r.csv: row 2: column 'price' is empty, and data.completion '{price:.0f}.00' formats it "
                            "as a number; fill in that cell or remove the row")
    assert to_example({"title": "", "price": 3}, d, "w")["prompt"] == ""  # an empty text cell is text


def test_json_list(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}]), encoding="utf-8")
    assert read_rows(str(path)) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert read_rows(str(path), max_rows=2) == [{"a": 1}, {"a": 2}]


def test_csv_cells_stay_the_users_text(tmp_path):
    """Cells are read as text: "007" and "1.10" keep their zeros; only a field a template formats as a number is
    converted, for that template alone (issue #22)."""
    path = tmp_path / "r.csv"
    path.write_text('title,price,qty,note,code\nChair,12.6,3,"cheap, sturdy",007\nDesk,-250,1,,1.10\n', encoding="utf-8")
    rows = read_rows(str(path))
    assert rows == [{"title": "Chair", "price": "12.6", "qty": "3", "note": "cheap, sturdy", "code": "007"},
                    {"title": "Desk", "price": "-250", "qty": "1", "note": "", "code": "1.10"}]
    d = cfg(prompt="{title} #{code} x{qty}", completion="{price:.0f}.00")
    assert to_example(rows[0], d, "w") == {"prompt": "Chair #007 x3", "completion": "13.00"}
    assert to_example(rows[1], d, "w") == {"prompt": "Desk #1.10 x1", "completion": "-250.00"}
    assert rows[0]["price"] == "12.6"  # the row itself is not changed
    d = cfg(prompt="{code:0>5} {qty:d}", completion="{price:,}")  # text padding; numeric type; grouping
    assert to_example(rows[0], d, "w") == {"prompt": "00007 3", "completion": "12.6"}
    assert to_example({"code": "12", "qty": "+4", "price": "1234.5"}, d, "w") == {"prompt": "00012 4",
                                                                                "completion": "1,234.5"}


def test_a_number_format_on_a_text_cell_names_file_row_and_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("title,price\nChair,12.6\nDesk,about 40\n", encoding="utf-8")
    rows = read_rows(str(path))
    d = cfg(prompt="{title}", completion="{price:.0f}.00")
    assert to_example(rows[0], d, f"{path}: row 1")["completion"] == "13.00"
    with pytest.raises(UserError) as e:
        to_example(rows[1], d, f"{path}: row 2")
    assert str(e.value) == (f"{path}: row 2: column 'price' is 'about 40', not a number, and data.completion "
                            "'{price:.0f}.00' formats it as a number ({price:.0f}); fix that cell, or drop the format "
                            "spec to keep it as text")
    assert "\n" not in str(e.value)
    assert to_example(rows[1], cfg(prompt="{title}", completion="{price}"), "w")["completion"] == "about 40"


def test_csv_ragged_line_is_named(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n3\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        read_rows(str(path))


def test_csv_with_utf8_bom(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes("\ufefftitle,price\nChair,12.6\n".encode("utf-8"))
    assert read_rows(str(path)) == [{"title": "Chair", "price": "12.6"}]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"title": "Chair", "price": 12.6, "qty": 3}, {"title": "Desk", "price": 250.0, "qty": 1}]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_rows(str(path)) == rows
    assert to_example(read_rows(str(path))[0], cfg(prompt="{title}", completion="{price:.0f}"), "w")["completion"] == "13"


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no rows"):
        read_rows(str(tmp_path / "e.jsonl"))
    with pytest.raises(UserError, match="not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
