"""scripts/host_profile.py: py-spy's raw samples are split into the training step's forward, the autograd thread's
backward (Python and C++ only), the loop around the step and the rest, and summed by function within each part."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import host_profile  # noqa: E402

P = 'process 1:"python bench.py";process 2:"python bench.py --child c"'
STEP = ("run (train/cli.py:10);Trainer._run_epoch (transformers/trainer.py:5);"
        "SFTTrainer.training_step (trl/trainer/sft_trainer.py:3)")
RAW = [
    f"{P};{STEP};late_loss (train/late_log.py:52);_forward (train/kernels/fused_lora.py:45) 6",
    f"{P};{STEP};late_loss (train/late_log.py:52);_forward (train/kernels/fused_lora.py:49) 2",  # same function
    f"{P};{STEP};late_loss (train/late_log.py:52);new_seed (train/kernels/lora_kernels.py:60) 2",
    f"{P};{STEP};Accelerator.backward (accelerate/accelerator.py:9);Tensor.backward (torch/_tensor.py:1) 1",
    f"{P};BackwardCFunction.apply (torch/autograd/function.py:1);_QLoraGroup.backward (train/kernels/fused_lora.py:9) 4",
    f"{P} 3",  # the autograd engine's thread: no Python frame
    f"{P};run (train/cli.py:10);Trainer._run_epoch (transformers/trainer.py:5);Optimizer.step (torch/optim.py:2) 2",
    f"{P};run (train/cli.py:10);Trainer._run_epoch (transformers/trainer.py:5);JITFunction._do_compile (triton/jit.py:1) 50",
    f"{P};run (train/cli.py:10);load (train/model.py:3) 9",
    "garbage line without a count",
]


def test_samples_land_in_their_part_and_function():
    samples = host_profile.parse(RAW)
    assert len(samples) == 9  # the line without a count is skipped
    parts = {}
    for frames, n in samples:
        where = host_profile.part(frames)
        parts[where] = parts.get(where, 0) + n
    # the Triton compile is warm-up work: in no part
    assert parts == {"forward": 10, "backward": 5, "engine": 3, "step loop": 2, "outside the step": 9, None: 50}
    text = host_profile.summarize(samples)
    assert "| forward | 10 | 50.0 % |" in text and "| engine | 3 | 15.0 % |" in text
    # line numbers merged: _forward's 8 samples are 80 % of the forward, all of them its own
    assert "| 80.0 % | 80.0 % | `_forward (train/kernels/fused_lora.py)` |" in text
    assert "| 80.0 % | 80.0 % | `_QLoraGroup.backward (train/kernels/fused_lora.py)` |" in text
    forward = text.split("**forward**")[1].split("**backward**")[0]
    assert "| 20.0 % | 20.0 % | `new_seed" in forward
    assert "late_loss" not in forward  # every forward sample passes through it: a caller that says nothing


def test_cli_prints_the_tables(tmp_path, capsys):
    path = tmp_path / "spy.txt"
    path.write_text("\n".join(RAW) + "\n")
    assert host_profile.main([str(path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| part | samples |") and "**step loop**" in out
