"""Padding-free batches: rows concatenated into one sequence must not attend to each other.

Runs the real path on CPU: the 4-bit tiny model as `fit` loads it, TRL's padding-free collator,
and the attention implementation `auto` resolves to here (sdpa with a block-diagonal mask).
"""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import small_config
from train import lora, model
from train.kernels import attention


@pytest.fixture(scope="module")
def tiny_4bit(tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("pack") / "run")
    assert cfg.train.packing == "padding_free"  # the default
    path = model.resolve_model_path(cfg.model)
    base = model.prepare_for_kbit(model.load_base(cfg, path, quiet=True), cfg)
    torch.manual_seed(0)
    peft_model = lora.wrap(base, cfg.lora)
    for name, p in peft_model.named_parameters():  # non-zero B, so the adapter is in the computation
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    peft_model.config.use_cache = False  # as fit() sets it: a KV cache disables the packed-sequence mask
    return peft_model.eval(), cfg


ROWS = [list(range(5, 45)), list(range(60, 75)), list(range(100, 163))]  # 40, 15 and 63 tokens


def per_row_losses(logits, labels, lengths):
    out, start = [], 0
    for n in lengths:
        lg, lb = logits[start : start + n - 1], labels[start + 1 : start + n]
        out.append(torch.nn.functional.cross_entropy(lg.float(), lb).item())
        start += n
    return out


@torch.no_grad()
def test_padding_free_rows_do_not_attend_to_each_other(tiny_4bit):
    net, cfg = tiny_4bit
    assert attention.resolve(cfg) == "sdpa"  # CPU: the clean fallback
    alone = []
    for row in ROWS:
        logits = net(input_ids=torch.tensor([row])).logits[0]
        alone += per_row_losses(logits, torch.tensor(row), [len(row)])
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": r, "labels": r} for r in ROWS])
    assert batch["input_ids"].shape == (1, sum(map(len, ROWS)))  # one flat row, no padding
    assert "attention_mask" not in batch or batch["attention_mask"].all()
    packed_logits = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    packed = per_row_losses(packed_logits, batch["input_ids"][0], list(map(len, ROWS)))
    assert packed == pytest.approx(alone, abs=2e-2)  # bf16 compute

    # Negative control: positions that do not restart make the rows one long sequence, so later rows
    # attend to earlier ones and their losses move: the check above can fail.
    leaky_positions = torch.arange(batch["input_ids"].shape[1])[None]
    leaky_logits = net(input_ids=batch["input_ids"], position_ids=leaky_positions).logits[0]
    leaky = per_row_losses(leaky_logits, batch["input_ids"][0], list(map(len, ROWS)))
    assert max(abs(a - b) for a, b in zip(leaky[1:], alone[1:])) > 0.1
