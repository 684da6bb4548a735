"""`train merge`: the default folds the adapter into the dequantized NF4 base (what was trained), and the merged
model is measured against the NF4 + adapter model `train eval` scores; `--overwrite` removes only merge's own files."""

import json

import pytest
import torch

from conftest import small_config
from families import one_thread  # noqa: F401  (fixture)
from test_bad_inputs import expect  # noqa: F401  (fixture: exit 2, one `error:` line)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """builtin:tiny-llama, 4 steps at a high learning rate (the adapter moves the answers), fp32 compute."""
    from train.fit import fit

    cfg = small_config(tmp_path_factory.mktemp("merge") / "run", quant={"compute_dtype": "float32"},
                       train={"max_steps": 4, "save_every": 4, "eval_every": None, "lr": 1e-2},
                       eval={"task": "numeric", "limit": 8, "batch_size": 8, "max_new_tokens": 4})
    return fit(cfg).run


def nf4_logits(run, ids):
    from train import adapter

    adapter_dir = adapter.find_adapter(run)
    model, _, _ = adapter.load(adapter_dir, adapter.load_config_of(adapter_dir))
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits


def test_default_merge_equals_the_model_eval_scored(run, tmp_path):
    """The saved merged model's logits equal NF4 + adapter's to fp32 rounding, and the report says so; the merge into
    the original base misses them by the quantization error (the gap the default closes)."""
    from train.merge import merge

    report = merge(str(run), str(tmp_path / "merged"))
    saved = json.loads((tmp_path / "merged/merge_check.json").read_text())
    assert saved["base"] == "dequantized" and saved["rows"] == 8 and saved["rows_from"] == "the run's eval rows"
    assert saved["answers_agree"] == saved["answers"] == 8 and saved["gap"] == report["gap"]
    assert report["gap"]["max_rel_diff"] < 1e-5 and report["max_rel_diff"] < 1e-5  # vs eval's model; the arithmetic
    ids = torch.tensor([list(range(10, 60))])
    want = nf4_logits(run, ids)
    torch.testing.assert_close(merged_logits(tmp_path / "merged", ids), want, rtol=0, atol=1e-4 * want.abs().max())

    original = merge(str(run), str(tmp_path / "original"), base="original")
    assert original["gap"]["max_rel_diff"] > 100 * report["gap"]["max_rel_diff"]  # NF4 rounding it never saw
    gap = (merged_logits(tmp_path / "original", ids) - want).abs().max()
    assert gap > 1e-3 * want.abs().max()


def test_overwrite_replaces_a_previous_merge_only(run, tmp_path, expect):  # noqa: F811
    """--overwrite replaces a merge's output; a directory holding anything else is refused, one line, exit 2,
    nothing deleted."""
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    expect(["merge", str(run), "--out", str(out), "--overwrite"], "holds files `train merge` did not write (notes.txt)")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    expect(["merge", str(run), "--out", str(out)], "directory is not empty")

    fresh = tmp_path / "fresh"
    from train.merge import merge

    merge(str(run), str(fresh), limit=2)
    files = sorted(p.name for p in fresh.iterdir())
    assert "merge_check.json" in files and "model.safetensors" in files
    merge(str(run), str(fresh), overwrite=True, limit=2)
    assert sorted(p.name for p in fresh.iterdir()) == files
    (fresh / "notes.txt").write_text("mine")
    expect(["merge", str(run), "--out", str(fresh), "--overwrite"], "did not write (notes.txt)")
    assert (fresh / "notes.txt").read_text() == "mine" and (fresh / "model.safetensors").is_file()
