"""Long rows on CPU (issue #21): the tiled MLP computes what the whole MLP does (losses and LoRA gradients, with and
without gradient checkpointing, and its replay reproduces LoRA dropout), checkpoint offloading moves exactly one
tensor per checkpointed layer and changes no gradient, and the config switches' rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from train.config import Config, DataCfg, ModelCfg, TrainCfg
from train.errors import UserError
from train.kernels import long_rows, offload, tiled_mlp

LAYERS, TOKENS, TILE = 3, 40, 8  # 40 tokens in chunks of 8: five chunks, the last one full


def tiny_lora(dropout: float = 0.0, gc: bool = False):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
    base = LlamaForCausalLM(cfg).float()
    if gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # as ours
        base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # nonzero B: every LoRA weight gets a gradient that depends on the MLP's values
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def step(model, seed: int = 1):
    torch.manual_seed(seed)
    ids = torch.randint(0, 97, (1, TOKENS))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys() and len(ga) == LAYERS * 7 * 2
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("gc", [False, True])
def test_tiled_mlp_equals_the_whole_mlp(gc):
    want = step(tiny_lora(gc=gc))
    model = tiny_lora(gc=gc)
    calls = []
    for layer in offload.checkpointed_layers(model):  # record the token count of every call the MLP itself gets
        inner = layer.mlp.forward
        layer.mlp.forward = lambda x, _f=inner: calls.append(x.shape[-2]) or _f(x)
    assert tiled_mlp.install(model, True, tile=TILE) == LAYERS
    got = step(model)
    assert_same(got, want)
    # chunks only: the forward, the backward's replay and, with checkpointing, the layer's recompute
    assert calls == [TILE] * (TOKENS // TILE) * LAYERS * (3 if gc else 2)


def test_tiled_replay_reproduces_lora_dropout():
    """With dropout each chunk draws its own mask; the backward's replay must draw the same one again."""
    model = tiny_lora(dropout=0.3)
    tiled_mlp.install(model, True, tile=TILE)
    replayed = step(model)
    model = tiny_lora(dropout=0.3)
    for layer in offload.checkpointed_layers(model):
        inner = layer.mlp.forward
        layer.mlp.forward = lambda x, _f=inner: tiled_mlp.chunked(_f, x, TILE, replay=False)
    assert_same(replayed, step(model), rtol=0, atol=0)
    assert not torch.equal(replayed[0], step(tiny_lora(dropout=0.3))[0])  # dropout is on: masks matter


def test_tiles_rule_and_install_once():
    assert not tiled_mlp.tiles("auto", tiled_mlp.AUTO_MIN_TOKENS - 1)
    assert tiled_mlp.tiles("auto", tiled_mlp.AUTO_MIN_TOKENS)
    assert tiled_mlp.tiles(True, tiled_mlp.TILE_TOKENS + 1) and not tiled_mlp.tiles(True, tiled_mlp.TILE_TOKENS)
    assert not tiled_mlp.tiles(False, 10**6)
    model = tiny_lora()
    assert tiled_mlp.install(model, "auto") == LAYERS and tiled_mlp.install(model, "auto") == 0
    mlp = offload.checkpointed_layers(model)[0].mlp
    mlp.forward = type(mlp).forward.__get__(mlp)  # what Liger's instance patch does when train() begins
    assert tiled_mlp.install(model, "auto") == 1


def test_offload_moves_each_layer_input_once_and_changes_nothing():
    want = step(tiny_lora(gc=True))
    model = tiny_lora(gc=True)
    off = offload.install(model, "cpu", min_bytes=1)
    got = step(model)
    assert_same(got, want, rtol=0, atol=0)
    # layer inputs only, the last layer's kept on the device (its backward comes first); each one copied back ahead
    assert (off.offloaded, off.prefetched) == (LAYERS - 1, LAYERS - 1)
    assert len(off.slabs) == 1  # one pinned slab holds them all, reused by the next step
    step(model, seed=2)
    assert off.offloaded == 2 * (LAYERS - 1) and len(off.slabs) == 1


def test_offload_hooks_stay_off_without_checkpointing():
    model = tiny_lora(gc=False)
    off = offload.install(model, "cpu", min_bytes=1)
    step(model)
    assert off.offloaded == 0  # without checkpointing every activation is saved: none of them is moved


def cfg_with(**train) -> Config:
    return Config(model=ModelCfg(name_or_path="x"), data=DataCfg(train="t.jsonl", max_length=131072),
                  train=dataclasses.replace(TrainCfg(), **train))


def test_offload_switch_rules():
    with pytest.raises(UserError, match="train.offload_checkpoints: true .* train.gradient_checkpointing is off"):
        long_rows.offloads(cfg_with(offload_checkpoints=True, gradient_checkpointing=False))
    if not torch.cuda.is_available():
        assert not long_rows.offloads(cfg_with(offload_checkpoints=True, gradient_checkpointing=True))
    # on a GPU: auto offloads whenever layers are checkpointed, whatever the row length (session 9); false never does
    assert long_rows.wants_offload("auto", True) and long_rows.wants_offload(True, True)
    assert not long_rows.wants_offload("auto", False) and not long_rows.wants_offload(False, True)


def test_the_trainer_installs_both_when_training_begins(tmp_path):
    """build_trainer's Trainer carries LongRows; its on_train_begin (after the Trainer bound Liger's forwards) wraps
    every MLP."""
    from datasets import Dataset

    from train import tiny
    from train.trainer import build_trainer

    cfg = cfg_with(tile_mlp="auto", max_steps=1)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(tmp_path)))
    model = tiny_lora()
    tr = build_trainer(cfg, model, tiny.build_tokenizer(), Dataset.from_dict({"input_ids": [[1, 2, 3]]}), None,
                       tmp_path)
    hooks = [cb for cb in tr.callback_handler.callbacks if isinstance(cb, long_rows.LongRows)]
    assert len(hooks) == 1
    hooks[0].on_train_begin(tr.args, tr.state, tr.control, model=tr.model)
    assert all(getattr(layer.mlp.forward, "tiled", False) for layer in offload.checkpointed_layers(model))
    assert getattr(model, "checkpoint_offload", None) is None or torch.cuda.is_available()


def test_offload_keeps_inputs_on_the_device_past_the_host_budget(monkeypatch):
    """A slab that would pass the pinned-RAM budget is not allocated: those layer inputs stay put, nothing changes."""
    want = step(tiny_lora(gc=True))
    monkeypatch.setattr(offload, "SLAB_TENSORS", 1)  # one layer input per slab: 5,120 bytes -> 8,192-byte slabs
    model = tiny_lora(gc=True)
    off = offload.install(model, "cpu", min_bytes=1, host_limit=8192)  # room for 1 of the LAYERS - 1 it would move
    assert_same(step(model), want, rtol=0, atol=0)
    assert (off.offloaded, off.kept, len(off.slabs)) == (1, LAYERS - 2, 1)


def test_offload_pins_the_largest_micro_batch_once(monkeypatch):
    """With reserve_tokens, the first offloaded input pins slabs for every layer's input at that many tokens: a later,
    longer micro-batch (up to it) pins nothing more, and the training step is unchanged."""
    want = step(tiny_lora(gc=True))
    model = tiny_lora(gc=True)
    off = offload.install(model, "cpu", min_bytes=1, reserve_tokens=3 * TOKENS)
    assert_same(step(model), want, rtol=0, atol=0)
    per_layer = 3 * TOKENS * 32 * 4  # tokens x hidden x fp32
    slabs = [s[0] for s in off.slabs]
    moved = LAYERS - 1  # the last layer's input stays on the device
    assert sum(s.numel() // per_layer for s in slabs) >= moved and sum(s.numel() for s in slabs) < 2 * moved * per_layer
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 3 * TOKENS))  # the longest micro-batch the reservation is for
    model(input_ids=ids, labels=ids).loss.backward()
    assert [id(s[0]) for s in off.slabs] == [id(s) for s in slabs] and off.offloaded == 2 * moved and off.kept == 0
    model = tiny_lora(gc=True)
    off = offload.install(model, "cpu", min_bytes=1, reserve_tokens=3 * TOKENS, host_limit=per_layer)
    assert_same(step(model), want, rtol=0, atol=0)  # no room for the reservation: slabs as needed, as without it
    assert off.offloaded + off.kept == moved


def test_each_process_on_a_host_pins_its_share_of_the_ram(monkeypatch):
    """Pinned memory cannot be swapped out: with 4 training processes on one host (torchrun's LOCAL_WORLD_SIZE) each
    offloader stops at a quarter of the budget a lone process gets, so together they stay within it."""
    monkeypatch.setattr(offload, "free_ram", lambda: 100 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = offload.CheckpointOffload("cpu").host_limit
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert alone == 80 * 2**30 and offload.CheckpointOffload("cpu").host_limit == alone / 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "junk")
    assert offload.CheckpointOffload("cpu").host_limit == alone
