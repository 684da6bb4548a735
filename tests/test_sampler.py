"""Training rows are drawn by transformers' BatchRebalanceSampler with the run's seed (and our token
partition for padding-free batches): each optimizer step sees the same rows as the random sampler
would, and under DDP the ranks get about the same tokens."""

import numpy as np
import torch
from accelerate.data_loader import SeedableRandomSampler
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.trainer_pt_utils import BatchRebalanceSampler

from conftest import small_config
from train import lora, trainer
from train.sampler import token_balanced_sampler_class

TokenBalancedSampler = token_balanced_sampler_class()


def lognormal_lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(400) - 0.5, 1.0, n)), 16, 2048).astype(int).tolist()


def test_trainer_uses_rebalance_sampler_with_the_run_seed(tmp_path, tiny_tok):
    cfg = small_config(tmp_path / "run", run={"seed": 7}, train={"batch_size": 3, "grad_accum": 2})
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=tiny_tok.vocab_size))
    lengths = [5 + (i * 7) % 40 for i in range(30)]
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "completion_mask": [[1] * n for n in lengths]})
    sft = trainer.build_trainer(cfg, lora.wrap(base, cfg.lora), tiny_tok, ds, None, tmp_path / "run")
    sampler = sft._get_train_sampler()
    assert isinstance(sampler, BatchRebalanceSampler) and sampler.seed == 7
    assert isinstance(sampler, TokenBalancedSampler) == sft.args.padding_free
    step1 = [i for mb in list(iter(sampler))[:2] for i in mb]
    random = SeedableRandomSampler(range(30), generator=torch.Generator(), data_seed=7)
    assert sorted(step1) == sorted(list(iter(random))[:6])  # the random sampler's first step, regrouped
    sampler.seed = 8
    assert sorted(i for mb in list(iter(sampler))[:2] for i in mb) != sorted(step1)
    sft.args.padding_free = True
    balanced = sft._get_train_sampler()
    assert isinstance(balanced, TokenBalancedSampler) and balanced.seed == 7
    assert sorted(i for mb in list(iter(balanced))[:2] for i in mb) == sorted(step1)


def test_ranks_get_balanced_tokens():
    lengths, rows, world, steps = lognormal_lengths(32 * 40), 16, 2, 40
    per_rank = [list(iter(TokenBalancedSampler(lengths, rows * world, world, 1, seed=1, rank=r))) for r in range(world)]
    rebalanced, random = [], []
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    for s in range(steps):
        tokens = [sum(lengths[i] for i in per_rank[r][s]) for r in range(world)]
        rebalanced.append(max(tokens) / (sum(tokens) / world))
        halves = [perm[s * 32: s * 32 + 16], perm[s * 32 + 16: s * 32 + 32]]
        tokens = [sum(lengths[i] for i in h) for h in halves]
        random.append(max(tokens) / (sum(tokens) / world))
        assert sorted(per_rank[0][s] + per_rank[1][s]) == sorted(perm[s * 32:(s + 1) * 32])
        assert len(per_rank[0][s]) == len(per_rank[1][s]) == rows  # train.batch_size rows per micro-batch
    # slowest rank's tokens over the mean: random halves ~1.17, balanced under 1.01
    assert np.mean(rebalanced) < 1.01 and np.mean(random) > 1.1


def test_each_epoch_reshuffles_on_one_process(tmp_path, tiny_tok):
    """Regression: on one process transformers' set_epoch never reached the batch sampler, so every epoch
    replayed epoch 0's rows in the same order. Train 2 epochs for real and record the rows of each step."""
    cfg = small_config(tmp_path / "run", run={"seed": 7},
                       train={"batch_size": 3, "grad_accum": 2, "max_steps": 10, "save_every": 1000})
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=tiny_tok.vocab_size))
    ids = [[3 + i] * (5 + (i * 7) % 20) for i in range(30)]  # row i is made of token 3 + i
    ds = Dataset.from_dict({"input_ids": ids, "completion_mask": [[1] * len(r) for r in ids]})
    sft = trainer.build_trainer(cfg, lora.wrap(base, cfg.lora), tiny_tok, ds, None, tmp_path / "run")
    seen = []
    collate = sft.data_collator

    def recording(rows):
        seen.extend(int(r["input_ids"][0]) - 3 for r in rows)
        return collate(rows)

    sft.data_collator = recording
    sft.train()
    epoch0, epoch1 = seen[:30], seen[30:60]
    assert sorted(epoch0) == sorted(epoch1) == list(range(30))  # each epoch sees every row once
    assert epoch0 != epoch1  # ... in a new order
    assert epoch1 == [i for mb in (sft.balanced.set_epoch(1) or iter(sft.balanced)) for i in mb]
