"""train.eval_every: null evaluates once at the end of fit (the model card's eval metrics); 0 evaluates never
during fit, for runs that `train eval` scores right after (the demo), so the eval set is not run twice."""

import json

import pytest

from conftest import small_config
from train.fit import fit


@pytest.mark.parametrize("every, evaluated", [(None, True), (0, False)])
def test_eval_every_zero_skips_the_end_of_fit_eval(tmp_path, every, evaluated):
    cfg = small_config(tmp_path / "run", train={"max_steps": 2, "save_every": 2, "grad_accum": 1, "eval_every": every},
                       eval={"during_training_limit": 4})
    fitted = fit(cfg)
    logged = [json.loads(line) for line in (fitted.run / "metrics.jsonl").read_text().splitlines()]
    assert ("eval_loss" in fitted.metrics) is evaluated
    assert any(k.startswith("eval_") for entry in logged for k in entry) is evaluated
    assert (fitted.run / "adapter" / "adapter_config.json").is_file()
