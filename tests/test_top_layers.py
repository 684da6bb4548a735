"""lora.top_layers: LoRA on the last N decoder layers only, so the backward pass stops below them (the
CPU demo's lever, README), on the real 4-bit path; the adapter reloads with the same layers."""

import pytest
import torch

from conftest import small_config
from train import lora, model
from train.errors import UserError


def _wrapped(tmp_path, **lora_cfg):
    cfg = small_config(tmp_path / "run", quant={"compute_dtype": "float32"}, lora={"dropout": 0.0, **lora_cfg})
    base = model.prepare_for_kbit(model.load_base(cfg, model.resolve_model_path(cfg.model), quiet=True), cfg)
    torch.manual_seed(0)
    peft_model = lora.wrap(base, cfg.lora)
    peft_model.config.use_cache = False
    return peft_model


def _adapted_layers(peft_model) -> set[int]:
    return {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters() if "lora_A" in n}


def _layers_reached_by_backward(peft_model) -> set[int]:
    """Indices of decoder layers whose backward ran for one loss.backward()."""
    reached: set[int] = set()
    layers = peft_model.get_base_model().model.layers
    handles = [layer.register_full_backward_hook(lambda m, gi, go, i=i: reached.add(i))
               for i, layer in enumerate(layers)]
    ids = torch.randint(5, 200, (2, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    return reached


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj"]])
def test_only_the_last_layers_are_adapted_and_backward_stops_below_them(tmp_path, targets):
    every = _wrapped(tmp_path / "all", target_modules=targets)
    top = _wrapped(tmp_path / "top", target_modules=targets, top_layers=2)
    n = len(every.get_base_model().model.layers)
    assert _adapted_layers(every) == set(range(n))
    assert _adapted_layers(top) == {n - 2, n - 1}
    # the same modules inside each adapted layer as without top_layers
    per_layer = lambda m: {k.split(".layers.")[1].split(".", 1)[1] for k, _ in m.named_parameters() if "lora_" in k}
    assert per_layer(top) == per_layer(every)
    assert _layers_reached_by_backward(every) == set(range(n))
    assert _layers_reached_by_backward(top) == {n - 2, n - 1}


def test_more_layers_than_the_model_has_is_one_line_before_the_weights_load(tmp_path):
    cfg = small_config(tmp_path / "run", lora={"top_layers": 9})
    message = r"lora.top_layers: 9 but the model has 4 decoder layers \(use at most 4"
    with pytest.raises(UserError, match=message):
        lora.preflight(model.preflight(cfg, model.resolve_model_path(cfg.model)), cfg.lora)
    with pytest.raises(UserError, match=message):
        _wrapped(tmp_path, top_layers=9)


def test_zero_is_refused_by_the_config(tmp_path):
    with pytest.raises(UserError, match=r"lora.top_layers must be >= 1"):
        small_config(tmp_path, lora={"top_layers": 0})


def test_resuming_with_other_layers_is_one_line(tmp_path):
    """A checkpoint's adapter and optimizer hold the layers it trained: another lora.top_layers cannot load them
    (the optimizer's parameter groups differ), so resume refuses in one line instead of a traceback."""
    from train import checkpoints
    from train.config import dump_config

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    dump_config(small_config(tmp_path / "run"), ckpt / "config.yaml")
    with pytest.raises(UserError, match=r"checkpoint-4 was trained with lora.top_layers=None, this config has 2; "):
        checkpoints.check_resume(ckpt, small_config(tmp_path / "run", lora={"top_layers": 2}), quiet=True)
