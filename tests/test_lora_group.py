"""LoRA layer groups (train/kernels/lora_group.py): q/k/v and gate/up computed as one fused Function give what the
layers alone give, on the real 4-bit CPU path, and anything the group cannot vouch for runs the layers alone."""

import copy

import pytest
import torch

from conftest import adapted_nf4, aten_calls, small_config
from test_lora_dropout import _loss_and_grads
from train.kernels import fused_lora, lora_group


def _model(tmp_path, groups=True, dropout=0.2):
    cfg = small_config(tmp_path / "run", quant={"compute_dtype": "float32"},
                       lora={"dropout": dropout, "kernel": "fused", "groups": groups})
    return adapted_nf4(cfg)


def _groups(model):
    found = {}
    for m in model.modules():
        g = m.__dict__.get("_lora_group")
        if g is not None:
            found[id(g)] = g
    return list(found.values())


@pytest.fixture
def count_runs(monkeypatch):
    """How many layers each fused Function computed, call by call."""
    sizes = []
    run = fused_lora.run
    monkeypatch.setattr(fused_lora, "run", lambda plans, *a: sizes.append(len(plans)) or run(plans, *a))
    return sizes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_model_equals_layers_alone(tmp_path, checkpointing, count_runs):
    """Whole tiny Llama with dropout: the same loss and gradients with and without groups (the group draws each
    member's mask from the same generator state, in the same order), with and without reentrant checkpointing."""
    grouped = _model(tmp_path)
    alone = copy.deepcopy(grouped)
    for m in alone.modules():
        m.__dict__.pop("_lora_group", None)
    groups = _groups(grouped)
    layers = grouped.config.num_hidden_layers
    want = [["gate_proj", "up_proj"], ["q_proj", "k_proj", "v_proj"]] * layers
    assert sorted(g.names for g in groups) == sorted(want)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    loss_a, grads_a = _loss_and_grads(alone, ids, checkpointing)
    count_runs.clear()
    loss_g, grads_g = _loss_and_grads(grouped, ids, checkpointing)
    passes = 2 if checkpointing else 1  # reentrant checkpointing: a forward without grad, then the recompute
    assert sorted(count_runs) == sorted(([1] * 2 * layers + [2] * layers + [3] * layers) * passes)  # o, down alone
    torch.testing.assert_close(loss_g, loss_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_g.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_g[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(g.pending is None and not g.broken for g in groups)  # every output claimed, nothing kept alive
    assert grouped.state_dict().keys() == alone.state_dict().keys()


def test_group_backward_stacks_no_weights_again(tmp_path):
    """A group's backward reads the stacked A its forward made (kept on the Function's context) instead of
    concatenating the members' weights again: its one concatenation is the members' gradients at x @ A.T."""
    model = _model(tmp_path)
    assert not model.is_gradient_checkpointing  # a recompute would stack A again, as its forward must
    model.train()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    with aten_calls() as calls:
        loss.backward()
    assert calls.names.count("cat") == len(_groups(model))


def test_groups_off_runs_every_layer_alone(tmp_path, count_runs):
    model = _model(tmp_path, groups=False)
    assert not _groups(model)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert set(count_runs) == {1}


def test_members_on_different_inputs_get_their_own_outputs(tmp_path, count_runs):
    """A caller that feeds siblings different tensors (or changes the input in place) gets each layer's own output; the
    group notices the unclaimed outputs, and from the next model.train() (a new training step) the members run alone."""
    model = _model(tmp_path, dropout=0.0).train()
    attn = model.base_model.model.model.layers[0].self_attn
    group = attn.q_proj.__dict__["_lora_group"]
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(1, 5, attn.q_proj.in_features, generator=g) for _ in range(2))

    def alone(layer, inp):
        saved = layer.__dict__.pop("_lora_group")
        try:
            return layer(inp)
        finally:
            layer.__dict__["_lora_group"] = saved

    with torch.no_grad():
        q = attn.q_proj(x)
        k = attn.k_proj(y)  # not x: q's group computed k on x, which must not be returned here
        torch.testing.assert_close(q, alone(attn.q_proj, x))
        torch.testing.assert_close(k, alone(attn.k_proj, y))
        assert group.unclaimed and not group.broken  # within a step the path stays what it was (see below)
        model.train()
        assert group.broken and group.pending is None
        before = len(count_runs)
        attn.v_proj(x)
        assert count_runs[before:] == [1]

    fresh = _model(tmp_path / "fresh", dropout=0.0).train()
    attn = fresh.base_model.model.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj(x)
        x.mul_(2)  # the same tensor, changed in place: k must see the new values
        torch.testing.assert_close(attn.k_proj(x), alone(attn.k_proj, x))


def test_siblings_on_copies_of_the_input_train_exactly_under_checkpointing(tmp_path):
    """k and v fed copies of q's input (as a hook that moves or copies inputs does). In the step where the group first
    sees that, its checkpointed recompute must take the forward's path and draw the same dropout masks: the loss and
    gradients equal the same step without checkpointing. From the next step the members run alone, exactly as
    without groups."""
    grouped = _model(tmp_path)
    alone = copy.deepcopy(grouped)
    for m in alone.modules():
        m.__dict__.pop("_lora_group", None)
    for model in (grouped, alone):
        for layer in model.base_model.model.model.layers:
            for name in ("k_proj", "v_proj"):
                getattr(layer.self_attn, name).register_forward_pre_hook(lambda mod, args: (args[0].clone(),))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))

    def assert_same(got, want):
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], atol=1e-5, rtol=1e-4, msg=name)

    checkpointed = copy.deepcopy(grouped)
    first = _loss_and_grads(checkpointed, ids, checkpointing=True)
    assert_same(first, _loss_and_grads(copy.deepcopy(grouped), ids, checkpointing=False))
    assert all(g.unclaimed for g in _groups(checkpointed) if "k_proj" in g.names)
    checkpointed.zero_grad(set_to_none=True)
    assert_same(_loss_and_grads(checkpointed, ids, checkpointing=True), _loss_and_grads(alone, ids, checkpointing=True))
    assert all(g.broken == ("k_proj" in g.names) for g in _groups(checkpointed))


def test_copy_of_a_model_mid_forward_has_its_own_groups(tmp_path):
    model = _model(tmp_path, dropout=0.0).train()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 3, attn.q_proj.in_features, requires_grad=True)
    attn.q_proj(x)  # k and v are pending: outputs of this graph, which deepcopy cannot copy
    twin = copy.deepcopy(model)
    twin_attn = twin.base_model.model.model.layers[0].self_attn
    group = twin_attn.q_proj.__dict__["_lora_group"]
    assert group.pending is None and group is twin_attn.v_proj.__dict__["_lora_group"]
    assert group.members == [twin_attn.q_proj, twin_attn.k_proj, twin_attn.v_proj]
