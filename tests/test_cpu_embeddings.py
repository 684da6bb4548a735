"""fp32 compute on a CPU without native bf16 keeps a large vocabulary's input embedding and LM head in the
checkpoint's bf16 (train/model.py keep_16bit_plan / keep_16bit, train/precision.py compute_from_16bit), and computes
what the fp32-loaded model computes. On the real NF4 path (load_base), tiny Llama (untied head) and Gemma 3 (tied,
scaled embedding) bases saved in bf16, with the size threshold lowered so they qualify: the matrices stay bf16 and the
footprint shrinks by 2 bytes a parameter; logits, a LoRA step's loss and gradients, greedy tokens and the weights
`train merge` reads are the fp32 path's; below the threshold nothing changes."""

import logging

import pytest
import torch

from conftest import small_config
from families import FAMILIES, build_tokenizer, model_config, one_thread  # noqa: F401  (fixture)
from train import model as model_lib
from train import precision

pytestmark = pytest.mark.usefixtures("one_thread")
HIDDEN = 96  # sqrt(96) = 9.798 is no bf16 value (9.8125): Gemma 3's embed_scale must be the fp32 model's
HEAD_CHUNK_ROWS = 64  # the tiny 320-token head in 5 chunks, so the chunked matmul really splits


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def base(request, tmp_path_factory):
    """(family, folder of a tiny bf16 checkpoint: config.json says bfloat16, every tensor stored in it)."""
    folder = tmp_path_factory.mktemp(request.param)
    save_bf16_checkpoint(request.param, folder)
    return request.param, str(folder)


def save_bf16_checkpoint(name: str, folder) -> None:
    """The family's tiny model (hidden HIDDEN, seeded) saved in bf16 with its tokenizer into `folder`."""
    import transformers

    from train import tiny

    family = FAMILIES[name]
    tok = build_tokenizer(family)
    config = model_config(family, tok)
    config.hidden_size = HIDDEN
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tok.save_pretrained(folder)
    tiny.save_weights(model, folder)


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(precision, "HEAD_CHUNK_BYTES", HEAD_CHUNK_ROWS * 4 * HIDDEN)


def config(path, tmp_path, **sections):
    return small_config(tmp_path / "run", model={"name_or_path": path}, quant={"compute_dtype": "float32"},
                        **sections)


def load(monkeypatch, path, tmp_path, keep: bool, **sections):
    """load_base with the threshold at 0 (keep) or out of reach (the plain fp32 path, as before this change)."""
    monkeypatch.setattr(model_lib, "KEEP_16BIT_MIN_SAVED", 0 if keep else float("inf"))
    cfg = config(path, tmp_path, **sections)
    return model_lib.load_base(cfg, path), cfg


def matrices(model):
    return {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt half carries no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_the_matrices_stay_bf16_and_the_footprint_shrinks(base, monkeypatch, tmp_path, caplog):
    import bitsandbytes as bnb

    name, path = base
    plain, _ = load(monkeypatch, path, tmp_path, keep=False)
    with caplog.at_level(logging.INFO, logger="train"):
        kept, _ = load(monkeypatch, path, tmp_path, keep=True)
    tied = name == "gemma3"
    assert (kept.get_output_embeddings().weight is kept.get_input_embeddings().weight) is tied
    assert all(w.dtype == torch.bfloat16 for w in matrices(kept).values())
    assert all(w.dtype == torch.float32 for w in matrices(plain).values())
    others = [p for p in kept.parameters() if p.is_floating_point() and id(p) not in matrices(kept)]
    assert others and all(p.dtype == torch.float32 for p in others)  # norms (and any skip-list layer): fp32
    assert all(b.dtype == torch.float32 for b in kept.buffers() if b.is_floating_point())
    assert all(m.weight.quant_state.dtype == torch.float32 for m in kept.modules() if isinstance(m, bnb.nn.Linear4bit))
    params = sum(w.numel() for w in matrices(kept).values())
    assert params == 320 * HIDDEN * (1 if tied else 2)
    assert plain.get_memory_footprint() - kept.get_memory_footprint() == 2 * params  # 4 bytes a parameter -> 2
    assert kept.config.dtype == torch.float32
    line = [r.getMessage() for r in caplog.records if "CPU float32 compute" in r.getMessage()]
    assert len(line) == 1 and "kept in bfloat16" in line[0] and "loaded in float32" not in line[0], line
    if tied:  # the fp32 model's scale, not bf16's 9.8125
        assert kept.get_input_embeddings().embed_scale.item() == torch.tensor(HIDDEN ** 0.5).item()


def test_logits_are_the_fp32_models(base, monkeypatch, tmp_path, chunked):
    """Measured here (2-core AVX2 EPYC): bit-exact, max |diff| 0 for both families."""
    _, path = base
    plain, _ = load(monkeypatch, path, tmp_path, keep=False)
    kept, _ = load(monkeypatch, path, tmp_path, keep=True)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        want, got = plain(**inputs).logits, kept(**inputs).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_a_lora_step_gives_the_fp32_paths_loss_and_gradients(base, monkeypatch, tmp_path, chunked):
    """Loss: the same (measured: the same bits, as the forward's). LoRA gradients: the LM head's input gradient sums
    its vocabulary chunks in another order than one matmul, so they agree to fp32 rounding (measured: within 8e-7 of
    each one's largest entry, both families)."""
    from train import lora
    from train.loss import labelled_positions_loss

    _, path = base
    results = []
    for keep in (False, True):
        base_model, cfg = load(monkeypatch, path, tmp_path, keep=keep, lora={"dropout": 0.0})
        base_model = model_lib.prepare_for_kbit(base_model, cfg)
        torch.manual_seed(1)  # the same LoRA A matrices
        peft_model = lora.wrap(base_model, cfg.lora)
        torch.manual_seed(2)  # B starts at zero, so A would get no gradient: the same random B in both
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(std=0.1)
        peft_model.enable_input_require_grads()  # as TRL does: the embedding's output requires grad
        peft_model.train()
        loss = labelled_positions_loss(peft_model, batch())
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    (want_loss, want), (got_loss, got) = results
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert got.keys() == want.keys()
    for n in want:
        assert (got[n] - want[n]).abs().max() <= 1e-5 * want[n].abs().max() + 1e-12, n


def test_greedy_generation_gives_the_same_tokens(base, monkeypatch, tmp_path, chunked):
    _, path = base
    inputs = {k: v[:, :5] for k, v in batch(1).items() if k != "labels"}
    tokens = []
    for keep in (False, True):
        model, _ = load(monkeypatch, path, tmp_path, keep=keep)
        tokens.append(model.generate(**inputs, max_new_tokens=10, do_sample=False, min_new_tokens=10))
    assert tokens[0].shape[1] == 15 and torch.equal(tokens[0], tokens[1])


def test_merge_reads_the_same_weights(base, monkeypatch, tmp_path):
    """`train merge` and `train export` fold the adapter into merge.dequantized_state of the loaded base: the bf16
    embeddings read back as the fp32 load's values, exactly."""
    from train import merge

    _, path = base
    states = []
    for keep in (False, True):
        model, cfg = load(monkeypatch, path, tmp_path, keep=keep)
        states.append(merge.dequantized_state(model, cfg))
    assert states[0].keys() == states[1].keys()
    assert all(states[1][k].dtype == torch.float32 and torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_below_the_threshold_nothing_changes(base, monkeypatch, tmp_path, caplog):
    name, path = base
    with caplog.at_level(logging.INFO, logger="train"):
        model = model_lib.load_base(config(path, tmp_path), path)  # the real threshold: a tiny vocabulary is below
    assert all(w.dtype == torch.float32 for w in matrices(model).values())
    assert "forward" not in vars(model.get_input_embeddings()) and "forward" not in vars(model.get_output_embeddings())
    assert not any("CPU float32 compute" in r.getMessage() for r in caplog.records)


def test_the_threshold_takes_gemma_3_1b_and_leaves_the_demos_smollm2(tmp_path):
    """Real shapes (meta device, no weights): Gemma 3 1B's tied 262144 x 1152 table saves 0.60 GB; SmolLM2-135M's
    49152 x 576 (the demo) would save 57 MB and stays on the fp32 path, its speed unchanged."""
    from train.plan_shape import known_base

    cfg = small_config(tmp_path / "run", quant={"compute_dtype": "float32"})
    plans = {}
    for name in ("google/gemma-3-1b-pt", "HuggingFaceTB/SmolLM2-135M"):
        model_config = known_base(name)
        model_config.dtype = torch.bfloat16
        plans[name] = model_lib.keep_16bit_plan(cfg, model_config, str(tmp_path))  # no weight files to read
    gemma = plans["google/gemma-3-1b-pt"]
    assert gemma.dtype == torch.bfloat16 and gemma.saved == 2 * 262144 * 1152  # 0.604 GB
    assert gemma.load == torch.float32  # without weight files to vouch for bf16 load, the fp32 load then a cast
    assert plans["HuggingFaceTB/SmolLM2-135M"] is None


def test_where_the_matrices_stay_fp32(base, monkeypatch, tmp_path):
    """Trained or LoRA-wrapped embeddings / head, bf16 compute, no quantization, an fp32 checkpoint: no plan."""
    _, path = base
    monkeypatch.setattr(model_lib, "KEEP_16BIT_MIN_SAVED", 0)
    model_config = model_lib.load_model_config(path, config(path, tmp_path).model)
    assert model_lib.keep_16bit_plan(config(path, tmp_path), model_config, path).load == torch.bfloat16
    for sections in ({"lora": {"modules_to_save": ["lm_head"]}},
                     {"lora": {"target_modules": ["q_proj", "embed_tokens"]}},
                     {"quant": {"compute_dtype": "bfloat16"}}, {"quant": {"mode": "none", "compute_dtype": "float32"}}):
        cfg = small_config(tmp_path / "run", model={"name_or_path": path},
                           **{"quant": {"compute_dtype": "float32"}, **sections})
        assert model_lib.keep_16bit_plan(cfg, model_config, path) is None, sections
    model_config.dtype = torch.float32
    assert model_lib.keep_16bit_plan(config(path, tmp_path), model_config, path) is None


def test_a_mixed_checkpoint_loads_in_fp32_then_casts(monkeypatch, tmp_path, chunked):
    """A checkpoint storing some tensors in fp32 (here the norms) would be rounded by a bf16 load: it loads in fp32
    and only the two matrices are cast down (exact: they were stored in bf16). Same logits as the fp32 path."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mixed"
    folder.mkdir()
    save_bf16_checkpoint("llama", folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.float() + 1e-3 if "norm" in k else v for k, v in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # + 1e-3: values bf16 cannot hold
    plain, _ = load(monkeypatch, str(folder), tmp_path, keep=False)
    kept, run_cfg = load(monkeypatch, str(folder), tmp_path, keep=True)
    plan = model_lib.keep_16bit_plan(run_cfg, model_lib.load_model_config(str(folder), run_cfg.model), str(folder))
    assert plan.load == torch.float32 and plan.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for w in matrices(kept).values())
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        want, got = plain(**inputs).logits, kept(**inputs).logits
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_fit_then_merge_as_on_the_fp32_path(base, monkeypatch, tmp_path, caplog):
    """End to end: `train fit` (TRL's trainer, our CPU loss) with the matrices kept bf16 trains as the fp32 path does;
    `train merge` of that run with them kept and without saves the same tensors (the tied Gemma 3 table included)
    with the same gap to the NF4 + adapter model."""
    from safetensors.torch import load_file

    from train.fit import fit
    from train.merge import merge

    _, path = base
    fitted = []
    for keep in (False, True):
        monkeypatch.setattr(model_lib, "KEEP_16BIT_MIN_SAVED", 0 if keep else float("inf"))
        cfg = config(path, tmp_path / f"fit-{keep}", train={"max_steps": 2, "save_every": 2, "eval_every": 0,
                                                             "lr": 1e-2},
                     eval={"task": "numeric", "limit": 4, "batch_size": 4, "max_new_tokens": 4})
        fitted.append(fit(cfg))
    assert fitted[1].metrics["train_loss"] == pytest.approx(fitted[0].metrics["train_loss"], rel=1e-5)
    assert fitted[1].model.get_input_embeddings().weight.dtype == torch.bfloat16
    reports, tensors = [], []
    for keep in (False, True):
        monkeypatch.setattr(model_lib, "KEEP_16BIT_MIN_SAVED", 0 if keep else float("inf"))
        out = tmp_path / f"merged-{keep}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="train"):
            reports.append(merge(str(fitted[1].run), str(out)))
        assert any("kept in bfloat16" in r.getMessage() for r in caplog.records) is keep  # the path merge took
        tensors.append(load_file(out / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys() and "model.embed_tokens.weight" in tensors[0]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert reports[0]["gap"] == reports[1]["gap"] and reports[0]["answers_agree"] == reports[1]["answers_agree"]
