"""configs/accelerate/*.yaml and rank-dependent placement, checked against accelerate itself.

accelerate rejects unknown top-level keys, but copies every key under fsdp_config / deepspeed_config
onto its launch arguments without checking, so a misspelt nested key is silently ignored. These
tests therefore check each file three ways: accelerate's own loader reads it, every key is one that
`accelerate launch` has an argument for, and the values reach the environment of the launched
processes (and the FSDP/DeepSpeed plugin built from it) as intended.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import unittest.mock as um
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ACC = REPO / "configs" / "accelerate"
SHIPPED = ["single_gpu.yaml", "ddp.yaml", "fsdp_qlora.yaml", "deepspeed_zero3.yaml", "multi_node.example.yaml"]


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ACC / name))


def raw(name: str) -> dict:
    return yaml.safe_load((ACC / name).read_text(encoding="utf-8"))


def launch_args(name: str):
    """What `accelerate launch --config_file NAME -m train fit x.yaml` resolves before starting processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACC / name), "-m", "train", "fit", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def launch_option_names(group_title: str) -> set[str]:
    """Argument names of one option group of `accelerate launch` (where config sub-keys end up)."""
    from accelerate.commands.launch import launch_command_parser

    groups = {g.title: g for g in launch_command_parser()._action_groups}
    assert group_title in groups, f"accelerate launch has no {group_title!r} group; groups: {sorted(groups)}"
    return {a.dest for a in groups[group_title]._group_actions}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Every file: accelerate's loader, known keys, common fields


def test_the_shipped_set_is_what_the_docs_describe():
    assert sorted(p.name for p in ACC.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_loads_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment

    cfg = load(name)  # raises ValueError on unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cfg.mixed_precision == "bf16"  # matches the default quant.compute_dtype: bfloat16
    assert cfg.use_cpu is False
    launch_args(name)  # the launcher's own checks pass (e.g. gpu_ids vs num_processes)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_is_one_accelerate_reads(name):
    from accelerate.commands.config.config_args import ClusterConfig

    data = raw(name)
    assert not set(data) - set(ClusterConfig.__dataclass_fields__), "unknown top-level keys"
    nested = {k for k, v in data.items() if isinstance(v, dict)}
    assert nested <= {"fsdp_config", "deepspeed_config"}, f"unexpected sections {nested}"
    if "fsdp_config" in data:
        unknown = set(data["fsdp_config"]) - launch_option_names("FSDP Arguments")
        assert not unknown, f"fsdp_config keys accelerate launch ignores: {unknown}"
    if "deepspeed_config" in data:
        unknown = set(data["deepspeed_config"]) - launch_option_names("DeepSpeed Arguments")
        assert not unknown, f"deepspeed_config keys accelerate launch ignores: {unknown}"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_file_is_commented(name):
    lines = (ACC / name).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#"), "each file opens with a comment saying what it is for"
    assert sum("#" in line for line in lines) >= 4


# --------------------------------------------------------------------------------------------
# Per file


def test_single_gpu():
    from accelerate.utils import DistributedType

    cfg = load("single_gpu.yaml")
    assert cfg.distributed_type == DistributedType.NO
    assert cfg.num_processes == 1 and cfg.num_machines == 1
    args, _ = launch_args("single_gpu.yaml")
    assert not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)


def test_ddp_two_processes_on_one_machine():
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    cfg = load("ddp.yaml")
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_processes == 2 and cfg.num_machines == 1
    num_processes_line = next(l for l in (ACC / "ddp.yaml").read_text().splitlines() if l.startswith("num_processes"))
    assert "#" in num_processes_line and "change" in num_processes_line.lower()
    args, _ = launch_args("ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert args.nproc_per_node == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_qlora_recipe():
    from accelerate.utils import DistributedType

    cfg = load("fsdp_qlora.yaml")
    assert cfg.distributed_type == DistributedType.FSDP
    assert cfg.num_processes == 2
    f = cfg.fsdp_config
    assert f["fsdp_version"] == 1
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_use_orig_params"] is False
    assert f["fsdp_cpu_ram_efficient_loading"] is True and f["fsdp_sync_module_states"] is True
    assert f["fsdp_offload_params"] is False
    assert f["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert f["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert f["fsdp_activation_checkpointing"] is False  # the Trainer refuses it together with gradient checkpointing
    text = (ACC / "fsdp_qlora.yaml").read_text()
    assert "quant.storage_dtype: bfloat16" in text


def test_fsdp_qlora_values_reach_the_processes_and_the_plugin():
    """Every fsdp_config key becomes an FSDP_* variable, and the plugin accelerate builds from them is the recipe."""
    import torch
    import accelerate.utils.dataclasses as acc_dataclasses
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy, StateDictType

    args, _ = launch_args("fsdp_qlora.yaml")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in raw("fsdp_qlora.yaml")["fsdp_config"].items():
        var = "FSDP_" + key.removeprefix("fsdp_").upper()
        expected = str(value).lower() if isinstance(value, bool) else str(value)
        assert env.get(var) == expected, f"{key}: {var}={env.get(var)!r}, want {expected!r}"

    fsdp_env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    # sync_module_states makes the plugin ask for the current GPU; pretend there is one (nothing is moved)
    # (accelerate >= 1.16 asks get_torch_accelerator_backend for the device type, older releases is_cuda_available)
    fake_gpu = (um.patch.object(acc_dataclasses, "get_torch_accelerator_backend", lambda: ("cuda", None))
                if hasattr(acc_dataclasses, "get_torch_accelerator_backend")
                else um.patch.object(acc_dataclasses, "is_cuda_available", lambda: True))
    with um.patch.dict(os.environ, fsdp_env), fake_gpu, um.patch.object(torch.cuda, "current_device", lambda: 0):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.use_orig_params is False
    assert plugin.sync_module_states is True and plugin.cpu_ram_efficient_loading is True
    assert plugin.cpu_offload.offload_params is False
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE
    assert plugin.activation_checkpointing is False
    assert plugin.auto_wrap_policy is not None  # transformer-based; the Trainer replaces it with PEFT's for LoRA


def test_deepspeed_zero3():
    from accelerate.utils import DistributedType

    cfg = load("deepspeed_zero3.yaml")
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.num_processes == 2
    d = cfg.deepspeed_config
    assert d["zero_stage"] == 3
    assert d["zero3_init_flag"] is True
    assert d["offload_optimizer_device"] == "none" and d["offload_param_device"] == "none"
    # Left out on purpose: set here they would override train.grad_accum / train.max_grad_norm.
    assert "gradient_accumulation_steps" not in d and "gradient_clipping" not in d
    assert "quant.storage_dtype: bfloat16" in (ACC / "deepspeed_zero3.yaml").read_text()


def test_deepspeed_zero3_values_reach_the_processes_and_the_plugin():
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from transformers.integrations import unset_hf_deepspeed_config

    args, defaults = launch_args("deepspeed_zero3.yaml")
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # one machine: plain torchrun-style launch, no deepspeed/pdsh runner
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env

    ds_env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    try:
        with um.patch.dict(os.environ, ds_env):
            plugin = DeepSpeedPlugin()  # does not need the deepspeed package
        assert plugin.zero_stage == 3 and plugin.zero3_init_flag is True
        ds = plugin.deepspeed_config
        assert ds["gradient_accumulation_steps"] == "auto"  # filled by the Trainer from train.grad_accum
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # ... and train.batch_size
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    finally:
        unset_hf_deepspeed_config()  # the plugin registers a global ZeRO-3 config; later tests must not see it


def test_multi_node_example():
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    cfg = load("multi_node.example.yaml")
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_machines == 2 and cfg.num_processes == 16  # num_processes counts GPUs on ALL machines
    assert cfg.machine_rank == 0 and cfg.main_process_ip and isinstance(cfg.main_process_port, int)
    text = (ACC / "multi_node.example.yaml").read_text()
    for key in ("machine_rank", "main_process_ip", "main_process_port", "num_machines", "num_processes"):
        line = next(l for l in text.splitlines() if l.startswith(key + ":"))
        assert "CHANGE" in line, f"{key} needs a comment saying what to change"
    args, _ = launch_args("multi_node.example.yaml")
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)


# --------------------------------------------------------------------------------------------
# Rank-dependent placement: train.model.device_map()


class _FakeState:
    """Stands in for accelerate.PartialState on global rank 5, local rank 1 (second GPU of some machine)."""

    process_index = 5
    local_process_index = 1


def test_device_map_follows_the_local_not_the_global_rank(monkeypatch):
    import accelerate
    import torch
    from train import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "PartialState", _FakeState)
    assert model.device_map() == {"": 1}


def test_device_map_is_none_without_a_gpu(monkeypatch):
    import torch
    from train import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model.device_map() is None


PROBE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=True)  # a real gloo group built from RANK/LOCAL_RANK/WORLD_SIZE, as torchrun sets them
    torch.cuda.is_available = lambda: True  # from here on device_map() takes its GPU branch
    from train.model import device_map

    out = {"rank": state.process_index, "local_rank": state.local_process_index, "map": device_map()}
    with open(os.path.join(sys.argv[1], f"rank{state.process_index}.json"), "w") as f:
        json.dump(out, f)
    state.wait_for_everyone()
    """
)


def test_device_map_per_rank_in_a_real_process_group(tmp_path):
    """Two processes with the environment torchrun gives them; each loads onto its own GPU index.

    A CPU-only host cannot let device_map() create the PartialState itself (with CUDA reported it
    would pick NCCL and call torch.cuda.set_device), so the probe first initialises accelerate's
    state on gloo, exactly as train.fit does on a GPU host before load_base, then reports CUDA.
    """
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(probe), str(tmp_path)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [{"rank": 0, "local_rank": 0, "map": {"": 0}}, {"rank": 1, "local_rank": 1, "map": {"": 1}}]


# --------------------------------------------------------------------------------------------
# A real 2-process DDP run of the demo through `accelerate launch` (gloo on CPU)


def test_ddp_two_process_cpu(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (simple launcher); the multi-process
    path on a CPU-only host is the torchrun launcher of configs/accelerate/ddp.yaml, which falls back to gloo."""
    from train.config import load_config

    run = tmp_path / "ddp"
    steps = 4
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACC / "ddp.yaml"),
           "--main_process_port", "0", "-m", "train", "fit", "configs/tiny.yaml",
           "--set", f"run.output_dir={run}", "--set", f"train.max_steps={steps}", "--set", "train.save_every=2",
           "--set", "train.eval_every=null", "--overwrite"]
    # A fresh model cache, so both ranks meet an unbuilt builtin:tiny-llama as on a first real run
    # (the session cache may or may not be built already, depending on which tests ran before).
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", QLORA_TRAIN_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("adapter saved") <= 1, "more than one rank saved the adapter"

    adapters = [p for p in run.rglob("adapter_model.safetensors") if "checkpoints" not in p.relative_to(run).parts]
    assert adapters == [run / "adapter" / "adapter_model.safetensors"]
    assert not list(run.glob(".adapter*")), "temporary adapter directories left behind"
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        assert (ckpt / "COMPLETE").is_file() and (ckpt / "adapter_model.safetensors").is_file()
        assert sorted(p.name for p in ckpt.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1)), "one row per step, not one per rank"
    # Two ranks really trained: each step consumed batch_size x grad_accum x 2 rows.
    cfg = load_config(REPO / "configs/tiny.yaml")
    n_rows = sum(1 for line in (REPO / cfg.data.train).read_text().splitlines() if line.strip())
    per_step = cfg.train.batch_size * cfg.train.grad_accum * 2
    assert train_rows[-1]["epoch"] == pytest.approx(steps * per_step / n_rows, abs=0.005)


def test_several_gpus_in_one_process_is_a_clear_error(monkeypatch):
    """Plain `python -m train fit` on a multi-GPU machine: say how to launch, before anything loads."""
    import torch

    from train import fit as fit_mod
    from train.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(fit_mod, "distributed_state", lambda: type("S", (), {"num_processes": 1})())
    from train.config import Config

    with pytest.raises(UserError, match="accelerate launch .*CUDA_VISIBLE_DEVICES=0"):
        fit_mod.check_launch(Config())
    monkeypatch.setattr(fit_mod, "distributed_state", lambda: type("S", (), {"num_processes": 2})())
    fit_mod.check_launch(Config())  # one process per GPU: fine


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launch_needs_bf16_storage_and_loads_without_device_map(monkeypatch, env):
    """FSDP / ZeRO-3 flatten one dtype per unit: uint8-packed 4-bit weights are refused before any load,
    and the base loads without a device_map (transformers refuses one under ZeRO-3)."""
    from train import fit as fit_mod
    from train import model as model_mod
    from train.config import Config
    from train.errors import UserError

    monkeypatch.setenv(env, "true")
    with pytest.raises(UserError, match="quant.storage_dtype: .*set quant.storage_dtype: bfloat16"):
        fit_mod.check_launch(Config())
    cfg = Config()
    cfg.quant.storage_dtype = "bfloat16"
    fit_mod.check_launch(cfg)
    cfg.quant.mode = "none"
    cfg.quant.storage_dtype = None
    fit_mod.check_launch(cfg)  # nothing packed to shard
    cfg.lora.use_dora = True
    if env == "ACCELERATE_USE_FSDP":  # its adapter save gathers plain LoRA A/B only
        with pytest.raises(UserError, match="lora.use_dora: the FSDP adapter save"):
            fit_mod.check_launch(cfg)
    else:
        fit_mod.check_launch(cfg)  # ZeRO-3's save goes through peft, which handles DoRA
    cfg.lora.use_dora = False
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: True)
    assert model_mod.device_map() is None
    monkeypatch.setenv(env, "false")
    monkeypatch.setattr("accelerate.PartialState", lambda: type("S", (), {"local_process_index": 1})())
    assert model_mod.device_map() == {"": 1}


def _ddp_fit(run, steps, extra=()):
    """2 gloo ranks on 64 demo rows, 4 rows x accumulation 2 per rank: 16 rows a step, 4 steps an epoch."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACC / "ddp.yaml"),
           "--main_process_port", "0", "-m", "train", "fit", "configs/tiny.yaml",
           "--set", f"run.output_dir={run}", "--set", f"train.max_steps={steps}", "--set", "train.save_every=2",
           "--set", "train.eval_every=null", "--set", "lora.dropout=0.1", "--set", "data.max_rows=64",
           "--set", "train.batch_size=4", "--set", "train.grad_accum=2", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def test_ddp_resume_equals_an_uninterrupted_run(tmp_path):
    """2 gloo processes: a run that lost its last checkpoint and its adapter resumes from checkpoint-6 —
    in the middle of its second epoch — on both ranks (per-rank RNG, data position and epoch through the
    token-balanced sampler, optimizer) and logs the same losses and saves the same adapter as the run
    that never stopped."""
    import shutil

    from safetensors.torch import load_file

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _ddp_fit(whole, 8, ["--overwrite"])
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-8")
    shutil.rmtree(resumed / "adapter")
    log = _ddp_fit(resumed, 8)
    assert "resuming from" in log and "checkpoint-6" in log

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return {r["step"]: r for r in rows if "loss" in r}

    assert sorted(losses(resumed)) == list(range(1, 9))
    assert 1 < losses(whole)[7]["epoch"] < 2  # step 7 is inside the second epoch
    for step in (7, 8):
        assert losses(resumed)[step]["loss"] == pytest.approx(losses(whole)[step]["loss"], rel=1e-5)
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (whole, resumed))
    assert a.keys() == b.keys() and all(torch_allclose(a[k], b[k]) for k in a)
    # the DDP adapter is a normal one: `train eval` reloads it onto the quantized base and scores it
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "train", "eval", str(resumed), "--limit", "8"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((resumed / "eval" / "report.json").read_text())
    assert report["rows"] == 8 and report["adapter"]["loss"] < report["base"]["loss"]


def torch_allclose(x, y):
    import torch

    return torch.allclose(x.float(), y.float(), atol=1e-6, rtol=1e-5)
