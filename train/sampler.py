"""Which rows go into which micro-batch: every optimizer step takes the random sampler's rows; under
DDP (or gradient accumulation) they are split so each rank and micro-batch gets about the same tokens."""

from __future__ import annotations

import heapq

from train import patches


def token_balanced(batch_indices, batch_lengths, dp_size: int, grad_accum: int) -> list[list[list[int]]]:
    """The partition of one optimizer step's rows for padding-free batches: [rank][micro-batch] -> indices.

    transformers' BatchRebalanceSampler prices padded micro-batches (rows x longest row + a quadratic
    term) and cuts the length-sorted rows into contiguous groups; a padding-free micro-batch costs its token
    count, so that leaves the slowest of 2 ranks ~10% above the mean on the benchmark's lengths (random
    halves: ~17%). Here every group keeps the same number of rows (train.batch_size) and rows go longest
    first to the group with the fewest tokens: under 1% apart (tests/test_sampler.py). A DDP step lasts as
    long as its slowest rank, so this is throughput.
    """
    groups = dp_size * grad_accum
    base, extra = divmod(len(batch_indices), groups)
    room = [base + (g < extra) for g in range(groups)]
    members: list[list[int]] = [[] for _ in range(groups)]
    heap = [(0, g) for g in range(groups) if room[g]]  # (tokens so far, group)
    for idx, length in sorted(zip(batch_indices, batch_lengths), key=lambda p: -p[1]):
        tokens, g = heapq.heappop(heap)
        members[g].append(idx)
        if len(members[g]) < room[g]:
            heapq.heappush(heap, (tokens + length, g))
    return [[members[slot * dp_size + r] for slot in range(grad_accum)] for r in range(dp_size)]


def rebalance_for(sampler, padding_free: bool, seed: int):
    """The Trainer's BatchRebalanceSampler, with the run's seed (transformers leaves its default, 42) and
    the token partition above for padding-free batches (through train/patches.py: the partition is a
    private method). Any other sampler is returned as it is."""
    if not isinstance(sampler, patches.check_rebalance_sampler()):
        return sampler
    if padding_free:
        sampler = patches.rebalanced(sampler, token_balanced)
    sampler.seed = seed
    return sampler


def token_balanced_sampler_class():
    """The BatchRebalanceSampler subclass that partitions with token_balanced (built in train/patches.py)."""
    return patches.balanced_class(token_balanced)
