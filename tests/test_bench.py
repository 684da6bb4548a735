"""scripts/bench.py's workload on CPU, without a GPU or a big write: the random model of another base (--base, issue
#20) has that base's widths and FLOP count, its weights load back for any family, and bad --base uses are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402  (scripts/ first on sys.path)
import bench_workload as wl  # noqa: E402

from train.model import meta_model  # noqa: E402


def linear_weights(cfg) -> int:
    return sum(m.weight.numel() for m in meta_model(cfg).modules() if isinstance(m, torch.nn.Linear))


def test_qwen_config_has_its_widths_and_the_tiny_tokenizers_ids():
    cfg = wl.model_config(base="Qwen/Qwen2.5-7B")
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3584, 18944, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (28, 4, 152064)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    assert not cfg.tie_word_embeddings and cfg.max_position_embeddings == 131072
    assert wl.model_config(base="qwen/qwen2.5-7b-instruct", positions=200_000).max_position_embeddings == 200_000
    assert wl.model_dir_name("Qwen/Qwen2.5-7B") == "model-qwen2.5-7b" != wl.model_dir_name(wl.DEFAULT_BASE)


@pytest.mark.parametrize("base", ["Qwen/Qwen2.5-7B", "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct"])
def test_matmul_params_are_the_meta_models_linear_weights(base):
    cfg = wl.model_config(base=base)
    assert wl.matmul_params(cfg) == linear_weights(cfg)


def test_matmul_params_by_hand():
    """Qwen2.5-7B: q/o h x h, k/v h x 512 (4 KV heads of 128), three h x i MLP weights, an untied head; Gemma-2-9b:
    q/o 3584 x 4096 (head_dim 256), k/v 3584 x 2048, its tied head once; Llama-3.1-8B: docs/benchmarks.md's 7.505e9."""
    h, i, vocab = 3584, 18944, 152064
    assert wl.matmul_params(wl.model_config(base="Qwen/Qwen2.5-7B")) == \
        28 * (2 * h * h + 2 * h * 512 + 3 * h * i) + h * vocab
    assert wl.matmul_params(wl.model_config(base="google/gemma-2-9b")) == \
        42 * (2 * h * 4096 + 2 * h * 2048 + 3 * h * 14336) + h * 256000
    assert wl.matmul_params(wl.model_config()) == 7_504_658_432


@pytest.mark.parametrize("model_type,extra", [("qwen2", {}), ("gemma2", {"tie_word_embeddings": True})])
def test_weights_of_another_family_load_back(tmp_path, model_type, extra):
    """write_weights on a tiny config of the family: Qwen2's q/k/v biases at 0, Gemma's norms (1 + w) at 0, a
    tied lm_head not written and tied on load; nothing missing, nothing unexpected."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=320,
                               **extra, **wl.TOKEN_IDS)
    cfg.save_pretrained(tmp_path)
    info = wl.write_weights(tmp_path, cfg)
    model, load = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not load["missing_keys"] and not load["unexpected_keys"]
    assert info["params"] == sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    norm = 0.0 if model_type == "gemma2" else 1.0
    assert all(bool((v == norm).all()) for k, v in state.items() if k.endswith("norm.weight"))
    biases = [v for k, v in state.items() if k.endswith(".bias")]
    assert (len(biases) == 6) == (model_type == "qwen2") and all(bool((b == 0).all()) for b in biases)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (model_type == "gemma2")


@pytest.mark.parametrize("argv,says", [
    (["--base", "acme/Llama-9B"], "--base: unknown base 'acme/Llama-9B'; known: meta-llama/Llama-3.1-8B, "),
    (["--tiny", "--base", "Qwen/Qwen2.5-7B"], "--tiny and --cpu bring their own model"),
    (["--cpu", "--model", "/tmp/m", "--base", "Qwen/Qwen2.5-7B"], "--tiny and --cpu bring their own model"),
    (["--base", "microsoft/Phi-3-mini-4k-instruct", "--ways", "c,unsloth"], "unsloth cannot run"),
    (["--base", "microsoft/Phi-3-mini-4k-instruct", "--plan-check", "--plan-stacks", "ours,unsloth"],
     "--plan-stacks unsloth cannot run"),
])
def test_bad_base_is_one_line(tmp_path, capsys, argv, says):
    assert bench.main([*argv, "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_plan_settings_and_known_names():
    assert wl.plan_settings("1x16384, 4X512") == [(1, 16384), (4, 512)]
    assert wl.resolve_base("GOOGLE/gemma-2-9b-it") == "google/gemma-2-9b" and wl.resolve_base("x/y") is None


def test_fused_layer_check_adds_qwens_biases(tmp_path, monkeypatch):
    """The bench's fused-layer check (way c) on a tiny Qwen2 with nonzero q/k/v biases, dropout 0 (so it checks
    against fp32): biased and unbiased layers of one shape are both checked, and both agree with the reference
    (before the bias was added to it, q_proj's output was 0.83 off). Each layer runs alone: its LoRA group neither
    computes the siblings inside its time nor ends up switched off (it did, the check's calls leaving outputs
    unclaimed)."""
    from bench_measure import fused_layer_check
    from families import family_config
    from train import lora, model
    from train.kernels import fused_lora

    # bf16 compute, as the bench trains: under fp32 compute the check's bf16 input sends every call to peft's path
    cfg = family_config(tmp_path / "run", "qwen2", lora={"dropout": 0.0, "kernel": "fused"},
                        quant={"compute_dtype": "bfloat16"})
    base = model.prepare_for_kbit(model.load_base(cfg, model.resolve_model_path(cfg.model), quiet=True), cfg)
    torch.manual_seed(0)
    peft_model = lora.wrap(base, cfg.lora)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or name.endswith("base_layer.bias"):  # B != 0 and real biases: every term counts
            p.data.normal_(0, 0.05 if "lora_B" in name else 1.0)
    groups = {id(g): g for m in peft_model.modules() for g in [m.__dict__.get("_lora_group")] if g is not None}
    assert groups
    fused_calls = []
    run = fused_lora.run
    monkeypatch.setattr(fused_lora, "run", lambda plans, *a, **k: fused_calls.append(len(plans)) or run(plans, *a, **k))
    out = fused_layer_check(peft_model, 16)
    assert fused_calls and set(fused_calls) == {1}  # the fused Function ran, on one layer at a time
    peft_model.train()  # settles the groups: an output left unclaimed switches them off here
    assert not any(g.broken for g in groups.values())
    assert all(m.__dict__.get("_lora_group") is g for g in groups.values() for m in g.members)
    assert {"64->64 +bias", "64->64", "64->32 +bias"} <= set(out)
    for row in out.values():
        assert max(row["max_rel_diff_vs_fp32"].values()) < 2e-2, row


# --------------------------------------------------------------------------------------------
# --memory-peak (scripts/memory_peak.py): the replay of a recorded step on a synthetic torch.cuda.memory._snapshot()

SITE = "/usr/lib/python3/site-packages"


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


def synthetic_snapshot() -> tuple[dict, dict]:
    """A snapshot in _snapshot()'s format (frames innermost first) and the stacks it uses. Before recording: W
    (1,000 B, still live at the end) and P (100 B, freed in the step: a free with no alloc). In the step: A 300
    (tiled MLP), B 200 (no Python frame), C 500 (transformers under our compute_loss): the peak, 2,000 B; then A
    freed, a bitsandbytes block of 250 come and gone, D 50 (live at the end). A's free_completed comes after a later
    alloc: the allocator's counters drop a block at free_requested."""
    import memory_peak as mp

    root = str(mp.ROOT)
    stacks = {
        "tiled": [frame(f"{SITE}/torch/utils/checkpoint.py", 10, "checkpoint"),
                  frame(f"{root}/train/kernels/tiled_mlp.py", 38, "chunked"),
                  frame(f"{root}/train/fit.py", 200, "run")],
        "llama": [frame(f"{SITE}/transformers/models/llama/modeling_llama.py", 250, "forward"),
                  frame(f"{SITE}/torch/nn/modules/module.py", 1, "_call_impl"),
                  frame(f"{root}/train/trainer.py", 300, "compute_loss")],
        "bnb": [frame(f"{SITE}/bitsandbytes/functional.py", 5, "dequantize_4bit"),
                frame(f"{SITE}/peft/tuners/lora/bnb.py", 7, "forward")],
    }
    snap = {"segments": [{"device": 0, "address": 0, "total_size": 4096, "stream": 0, "blocks": [
        {"address": 0, "size": 1024, "requested_size": 1000, "state": "active_allocated", "frames": []},
        {"address": 1024, "size": 512, "requested_size": 50, "state": "active_allocated", "frames": stacks["tiled"]},
        {"address": 1536, "size": 2560, "requested_size": 0, "state": "inactive"}]}],
        "device_traces": [[
            {"action": "alloc", "addr": 2000, "size": 300, "frames": stacks["tiled"]},  # 1,400
            {"action": "alloc", "addr": 3000, "size": 200, "stream": 0},  # 1,600; no frames key
            {"action": "free_requested", "addr": 5000, "size": 100, "frames": []},  # P: 1,500
            {"action": "free_completed", "addr": 5000, "size": 100, "frames": []},
            {"action": "alloc", "addr": 4000, "size": 500, "frames": stacks["llama"]},  # 2,000: the peak
            {"action": "free_requested", "addr": 2000, "size": 300, "frames": stacks["tiled"]},  # 1,700
            {"action": "alloc", "addr": 6000, "size": 250, "frames": stacks["bnb"]},  # 1,950
            {"action": "free_requested", "addr": 6000, "size": 250, "frames": stacks["bnb"]},  # 1,700
            {"action": "free_completed", "addr": 2000, "size": 300, "frames": stacks["tiled"]},
            {"action": "segment_alloc", "addr": 8192, "size": 4096},
            {"action": "alloc", "addr": 1024, "size": 50, "frames": stacks["tiled"]},  # D: 1,750
            {"action": "free_requested", "addr": 3000, "size": 200},  # 1,550
            {"action": "free_requested", "addr": 4000, "size": 500, "frames": stacks["llama"]},  # 1,050
        ]]}
    return snap, stacks


def test_memory_peak_replay_finds_the_peak_and_what_is_live():
    """The peak counts the blocks from before recording (W live throughout, P until its free), frees at
    free_requested, and lists W, A, B, C as live then (not P, freed before; not the later bnb block nor D)."""
    import memory_peak as mp

    snap, _ = synthetic_snapshot()
    r = mp.replay(snap)
    assert (r["peak_bytes"], r["peak_index"], r["initial_bytes"], r["final_bytes"]) == (2000, 4, 1100, 1050)
    assert r["odd_events"] == 0 and r["events"] == 13
    assert {b["addr"]: b["size"] for b in r["live"]} == {0: 1000, 2000: 300, 3000: 200, 4000: 500}
    before = {b["addr"]: b["origin"] for b in mp.initial_blocks(snap).values()}
    assert before == {0: "before the step, live after it", 5000: "before the step, freed in it"}


def test_memory_peak_groups_by_site_and_writes_the_table(tmp_path):
    """Our innermost frame first (with the library frame under it), then the libraries, then torch; C++ allocations
    of the step as autograd's; blocks from before the step by what `known` calls them; sizes in [tokens, hidden]
    bf16 units (10 x 10 x 2 = 200 B); the files, and the snapshot saved only under the size limit."""
    import json

    import memory_peak as mp

    snap, stacks = synthetic_snapshot()
    rep = mp.analyse(snap, tokens=10, hidden=10, known={0: "4-bit base weights"})
    got = {g["site"]: (g["blocks"], g["bytes"], g["x_hidden"]) for g in rep["groups"]}
    assert got == {
        "before the step, live after it: 4-bit base weights": (1, 1000, 5.0),
        "train/trainer.py:300 compute_loss via transformers/models/llama/modeling_llama.py:250 forward": (1, 500, 2.5),
        "train/kernels/tiled_mlp.py:38 chunked": (1, 300, 1.5),
        mp.NO_FRAME: (1, 200, 1.0)}
    assert [g["bytes"] for g in rep["groups"]] == [1000, 500, 300, 200]
    assert mp.site(stacks["bnb"]) == "bitsandbytes/functional.py:5 dequantize_4bit"
    assert mp.site(stacks["tiled"][:1]) == "torch/utils/checkpoint.py:10 checkpoint" and mp.site([]) is None
    assert rep["peak_event"]["site"].startswith("train/trainer.py:300") and rep["largest_blocks"][0]["x_hidden"] == 5.0
    text = mp.write(rep, tmp_path / "mem", snap)
    assert mp.load(tmp_path / "mem" / "snapshot.pickle.gz") == snap
    assert json.loads((tmp_path / "mem" / "memory_peak.json").read_text())["peak_bytes"] == 2000
    assert "| 2 | train/trainer.py:300 compute_loss via" in text and "Replayed peak 0.000 GB at event 4 of 13" in text
    assert mp.save_snapshot(snap, tmp_path / "big.pickle.gz", limit=10).startswith("not saved")
    assert not (tmp_path / "big.pickle.gz").exists()


def test_memory_peak_recorder_glue(tmp_path, monkeypatch):
    """make_recorder as the Trainer drives it, torch.cuda faked: it records step 2 only (start, snapshot, stop),
    and at the end writes the files with the allocator's counters beside the replay."""
    import types

    from transformers import TrainerCallback  # noqa: F401 - imported before torch.cuda is faked

    import memory_peak as mp

    snap, _ = synthetic_snapshot()
    calls = []
    stats = iter([{"requested_bytes.all.current": 1100, "requested_bytes.all.peak": 1500, "allocation.all.allocated": 0,
                   "allocation.all.freed": 0, "allocated_bytes.all.peak": 1600},
                  {"requested_bytes.all.current": 1050, "requested_bytes.all.peak": 2000, "allocation.all.allocated": 5,
                   "allocation.all.freed": 4, "allocated_bytes.all.peak": 2048, "segment.all.allocated": 1}])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a: next(stats))
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda enabled="all", **k: calls.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a: snap)
    rec = mp.make_recorder(2, tmp_path / "mem", lambda: 10)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=10), named_parameters=lambda: [],
                                  named_buffers=lambda: [])
    for step in (0, 1, 2):
        st = types.SimpleNamespace(global_step=step)
        rec.on_step_begin(None, st, None)
        st.global_step += 1
        rec.on_step_end(None, st, None, model=model)
    rec.on_train_end(None, st, None)
    assert calls == ["all", None]
    s = rec.summary
    assert s["peak_gb"] == 2000 / 1e9 and s["replay_vs_requested_peak"] == 0.0 and abs(s["max_memory_allocated_gb"]
                                                                                       - 2048 / 1e9) < 1e-15
    assert s["recording"]["events_expected"] == 14 and s["recording"]["dropped_estimate"] == 0
    assert "this step" in s["note"] and (tmp_path / "mem" / "memory_peak.md").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_memory_peak_without_cuda_is_one_line(tmp_path, capsys):
    assert bench.main(["--tiny", "--memory-peak", "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--memory-peak" in err and "GPU" in err
    assert not (tmp_path / "w").exists()


def test_prepare_writes_the_inputs_and_runs_no_way(tmp_path, capsys):
    """--prepare (long_context_check.sh prepare): the model, the data and the plan check's fixed-length rows the same
    arguments would train on are written, and no way runs (no results, no run directory)."""
    work = tmp_path / "w"
    assert bench.main(["--tiny", "--prepare", "--ways", "c", "--plan-check", "--plan-tokens", "1x512",
                       "--work", str(work)]) == 0
    assert "prepared" in capsys.readouterr().out
    assert (work / wl.model_dir_name(wl.DEFAULT_BASE, True) / "bench_model.json").is_file()
    assert list(work.glob("data-fixed-512x*/train.jsonl")) and (work / "bench_ctx.json").is_file()
    assert not (work / "runs").exists() and not list((work / "results").iterdir())


def test_alternate_flips_the_switch_between_timed_steps_and_splits_them(monkeypatch):
    """BENCH_ALTERNATE: the warm-up steps run with the switch on, then the timed steps alternate 1, 0, 1, 0; the
    summary splits tokens and time by setting."""
    import os
    import types

    import bench_measure as bm

    monkeypatch.setenv("BENCH_ALTERNATE", "TRAIN_LEAN_RECOMPUTE")
    monkeypatch.setenv("TRAIN_LEAN_RECOMPUTE", "0")  # restored after the test
    timer = bm.make_timer(warmup=2, steps=4)
    assert os.environ["TRAIN_LEAN_RECOMPUTE"] == "1"  # on before the trainer is built: it installs what =1 needs
    state = types.SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    timer.on_train_begin(None, state, None)
    seen = []
    for step in range(6):
        timer.on_step_begin(None, state, None)
        seen.append(os.environ["TRAIN_LEAN_RECOMPUTE"])
        state.global_step += 1
        timer.on_step_end(None, state, None)
    assert seen == timer.settings == ["1", "1", "1", "0", "1", "0"]
    timer.marks = [(i, float(i * i), 0, 0.0) for i in range(7)]  # step i took 2i + 1 s
    split = bm.alternated(timer, [10, 20, 30, 40, 50, 60], warmup=2, end=6)
    assert split["switch"] == "TRAIN_LEAN_RECOMPUTE"
    assert split["1"] == {"steps": 2, "tokens": 80, "s": 14.0, "tok_per_s": round(80 / 14, 1)}  # steps 2 and 4
    assert split["0"] == {"steps": 2, "tokens": 100, "s": 18.0, "tok_per_s": round(100 / 18, 1)}  # steps 3 and 5
    assert split["paired"] is None  # one =1 step (4) has =0 steps on both sides: no spread to judge
    timer.settings.append("1")  # an odd count of timed steps: the last =1 step has no =0 step after it
    timer.marks.append((7, 49.0, 0, 0.0))
    assert bm.alternated(timer, [10, 20, 30, 40, 50, 60, 70], warmup=2, end=7)["1"]["steps"] == 3
    monkeypatch.setenv("BENCH_ALTERNATE", "TRAIN_LATE_LOG")
    with pytest.raises(ValueError, match="only a switch read at every step"):
        bm.make_timer(warmup=2, steps=4)


def test_paired_interval_sees_through_host_drift_and_says_when_it_does_not_resolve():
    """The A/B's verdict: a switch worth 5 % on a host that slows by 3 % a step is measured as 5 % from each =1 step
    against the =0 steps on either side (the ratio of the two settings' totals says 8 %), and ratios that scatter
    around 1 give an interval containing 1."""
    import types

    import bench_measure as bm

    secs = [1.03 ** i * (1 / 1.05 if i % 2 == 0 else 1.0) for i in range(16)]  # =1 steps (even) 5 % faster
    marks = [(0, 0.0, 0, 0.0)]
    for i, t in enumerate(secs):
        marks.append((i + 1, marks[-1][1] + t, 0, 0.0))
    timer = types.SimpleNamespace(alternate="TRAIN_X", settings=["1", "0"] * 8, marks=marks)
    split = bm.alternated(timer, [1000] * 16, warmup=0, end=16)
    assert split["1"]["tok_per_s"] / split["0"]["tok_per_s"] == pytest.approx(1.0816, abs=1e-3)  # drift mixed in
    pair = split["paired"]
    assert pair["ratios"] == 7 and pair["resolved"]  # =1 steps 2..14 (step 0 has no =0 step before it)
    assert pair["ratio"] == pair["low"] == pair["high"] == pytest.approx(1.05, abs=1e-4)
    noisy = bm.paired_interval([0.97, 1.04, 0.99, 1.02, 0.95, 1.05])
    assert not noisy["resolved"] and noisy["low"] < 1.0 < noisy["high"]
    assert bm.paired_interval([0.9, 0.92, 0.91])["resolved"]
    assert bm.paired_interval([1.1]) is None  # one ratio has no spread to judge


def test_alternating_the_direct_launch_sets_the_attribute_each_launch_reads(monkeypatch):
    """TRAIN_DIRECT_LAUNCH is read once at import (a launch does not look up the environment): alternating it must
    flip launch.DIRECT itself, or the A/B would compare the direct path with itself."""
    import types

    import bench_measure as bm
    from train.kernels import launch

    monkeypatch.setattr(launch, "DIRECT", False)  # restored after the test
    monkeypatch.setenv("BENCH_ALTERNATE", "TRAIN_DIRECT_LAUNCH")
    monkeypatch.setenv("TRAIN_DIRECT_LAUNCH", "0")
    timer = bm.make_timer(warmup=1, steps=2)
    assert launch.DIRECT is True
    state = types.SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    timer.on_train_begin(None, state, None)
    seen = []
    for _ in range(3):
        timer.on_step_begin(None, state, None)
        seen.append(launch.DIRECT)
        state.global_step += 1
        timer.on_step_end(None, state, None)
    assert seen == [True, True, False]


def test_same_batch_repeats_the_first_micro_batch(monkeypatch):
    """BENCH_SAME_BATCH=1: the collator sees the first call's examples every time (an A/B whose steps do the same
    work); unset, each call collates its own."""
    import bench_measure as bm

    def collate(examples):
        import torch

        return {"input_ids": torch.tensor([[e["input_ids"][0] for e in examples]])}

    batches = [[{"input_ids": [1, 2]}, {"input_ids": [3]}], [{"input_ids": [4, 5, 6]}]]
    for same, expect in (("1", [[1, 3], [1, 3]]), ("0", [[1, 3], [4]])):
        monkeypatch.setenv("BENCH_SAME_BATCH", same)
        log: list = []
        wrapped = bm.count_batches(collate, log)
        assert [wrapped(b)["input_ids"][0].tolist() for b in batches] == expect
        assert [entry["lens"] for entry in log] == ([[1, 2], [1, 2]] if same == "1" else [[1, 2], [3]])


def test_gemm_host_without_cuda_is_one_line_exit_2(capsys):
    """scripts/gemm_host.py times cuBLAS: without a GPU it says so in one line (exit 2)."""
    import gemm_host

    if gemm_host.torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    assert gemm_host.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA GPU" in err
