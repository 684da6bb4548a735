"""Every model family the README names (tests/families.py: Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3),
on CPU with real bitsandbytes NF4: per family one fit -> interrupt -> resume -> eval -> merge -> generate chain
with lora.target_modules all-linear, a short fit on an explicit target list, the attention each one runs, the
tokens its generation stops on, and the combinations we refuse (one line, exit 2).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from families import FAMILIES, family_config, materialize, one_thread  # noqa: F401  (fixture)
from test_bad_inputs import expect  # noqa: F401  (fixture: exit 2, one `error:` line, nothing written)
from test_pipeline import SignalAt, losses
from train import adapter
from train.model import meta_model
from train.errors import Interrupted
from train.eval import evaluate
from train.fit import fit

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = list(FAMILIES)
OWN_ATTENTION = {"gemma2": "eager"}  # CPU: the rest run sdpa; Gemma 2's softcap has no sdpa path

# The chain's budget: 4 steps of 4 rows, interrupted at step 3; 8 eval rows of 4 new tokens, scored by `train eval`
# (fit itself takes the eval loss only: eval.task none)
CHAIN = dict(train={"max_steps": 4, "grad_accum": 1, "save_every": 2, "eval_every": None},
             data={"max_rows": 40},  # 32 train + 8 eval rows
             eval={"task": "none", "limit": 8, "batch_size": 8, "max_new_tokens": 4})


@pytest.fixture(scope="module", params=NAMES)
def chain(request, tmp_path_factory):
    """Family `param`, all-linear: one uninterrupted 4-step run, one stopped by SIGINT at step 3 and resumed."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    whole = fit(family_config(root / "whole", name, **CHAIN))
    cut = family_config(root / "cut", name, **CHAIN)
    with pytest.raises(Interrupted):
        fit(cut, callbacks=[SignalAt(3)])
    resumed = fit(cut)
    return {"name": name, "whole": whole, "resumed": resumed, "root": root}


def lora_targets(model) -> dict[str, int]:
    """{module leaf name: how many modules of that name carry LoRA}."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            leaf = name.rsplit(".", 1)[-1]
            out[leaf] = out.get(leaf, 0) + 1
    return out


def test_family_trains_on_its_own_attention_and_resumes_exactly(chain):
    net, name = chain["whole"].model, chain["name"]
    base = net.get_base_model()
    assert type(base).__name__ == FAMILIES[name].model_class
    assert base.config._attn_implementation == OWN_ATTENTION.get(name, "sdpa")
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules()), "the real NF4 path"
    projections = {n.rsplit(".", 1)[-1] for n, m in meta_model(base.config).named_modules()
                   if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    layers = base.config.num_hidden_layers
    assert lora_targets(net) == {p: layers for p in projections}  # all-linear: every projection, fused ones too
    whole, resumed = losses(chain["whole"].run), losses(chain["resumed"].run)
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4]
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step
    assert whole[4] < whole[1] - 0.3, whole


def test_family_eval_merge_generate(chain, tmp_path, capsys):
    """eval: the adapter beats the base on loss, and its greedy answers at batch 1 equal those at batch 8;
    merge: the merged model's logits equal base + adapter's (merge() checks, and refuses to save otherwise);
    generate: the CLI answers."""
    from train.cli import main
    from train.merge import MAX_REL_DIFF, merge

    run = chain["whole"].run
    report = evaluate.evaluate_run(str(run), overrides=["eval.task=numeric"])
    assert report["adapter"]["loss"] < report["base"]["loss"] - 0.3 and report["adapter"]["task"]["n"] == 8
    batch8 = [json.loads(x)["adapter_output"] for x in (run / "eval/predictions.jsonl").read_text().splitlines()]
    adapter_dir, cfg, tok, examples, _ = evaluate.prepare_eval(str(run), None, None, ["eval.task=numeric"])
    model, tok, _ = adapter.load(adapter_dir, cfg, tok)
    batch1 = evaluate.generate(model, tok, examples, cfg.eval.max_new_tokens, batch_size=1)
    assert cfg.eval.batch_size == 8 and len(set(batch8)) > 1 and batch1 == batch8  # varied, and batch-invariant
    check = merge(str(run), str(tmp_path / "merged"))
    assert check["max_rel_diff"] < MAX_REL_DIFF and (tmp_path / "merged/model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "A steel kettle, 2 l.", "--max-new-tokens", "3"]) == 0
    assert "--- answer ---" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_family_explicit_targets(name, tmp_path):
    """LoRA on the family's own list (Phi-3: the fused qkv_proj and gate_up_proj): exactly those modules in every
    layer, and the loss falls. Fit only: the chain above covers resume, eval, merge and generate."""
    targets = list(FAMILIES[name].targets)
    cfg = family_config(tmp_path / "run", name, lora={"target_modules": targets},
                        train={"max_steps": 3, "grad_accum": 1, "save_every": 3, "eval_every": None},
                        data={"max_rows": 24, "eval_fraction": 0.0}, eval={"task": "none"})
    fitted = fit(cfg)
    layers = fitted.model.get_base_model().config.num_hidden_layers
    assert lora_targets(fitted.model) == {t: layers for t in targets}
    steps = losses(fitted.run)
    assert steps[3] < steps[1], steps


@pytest.mark.parametrize("name, override, needle", [
    ("phi3", {"lora": {"target_modules": ["q_proj", "v_proj"]}}, "lora.target_modules: ['q_proj', 'v_proj'] not found"),
    ("gemma2", {"model": {"attn_implementation": "sdpa"}}, "model.attn_implementation: Gemma2ForCausalLM has no sdpa"),
    ("mistral", {"model": {"attn_implementation": "sdpa_varlen"}}, "model.attn_implementation: sdpa_varlen needs"),
])
def test_unsupported_combination_is_one_line_exit_2(name, override, needle, tmp_path, expect):  # noqa: F811
    raw = family_config(tmp_path / "run", name).to_dict()
    for section, values in override.items():
        raw[section].update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    expect(["fit", str(path)], needle)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- stop tokens


def first_token_as(model, ids: torch.Tensor, target: int) -> None:
    """Make greedy decoding emit `target` first: its output row becomes twice the row of the token the model
    would emit (whose logit is the largest and positive, so twice it wins; softcaps keep the order)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        top = int(logits.argmax())
        assert logits[top] > 0 and top != target
        head = model.get_output_embeddings().weight
        head[target] = 2 * head[top]


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_on_the_template_end_of_turn_and_generation_config_ids(name):
    """The chat template's end of turn stops generation even where generation_config lists only the tokenizer's
    EOS (a base model's config); a token generation_config lists stops it too, though neither EOS nor end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, path = FAMILIES[name], materialize(name)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    end = tok.convert_tokens_to_ids(family.end_of_turn)
    assert evaluate.end_of_turn_id(tok) == end
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert evaluate.stop_ids(model, tok) == list(dict.fromkeys(tok.convert_tokens_to_ids(list(family.stops))
                                                                + [tok.eos_token_id, end]))
    prompt = tok("Price is $")["input_ids"]
    ids = torch.tensor([prompt])
    example = [{"prompt_ids": prompt}]

    model.generation_config.eos_token_id = tok.eos_token_id
    first_token_as(model, ids, end)
    assert evaluate.generate(model, tok, example, 5, 1) == [""]  # stopped at once; the stop token is not text
    with torch.no_grad():  # control: told only the EOS, transformers generates past the end of turn
        run_on = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
    if end != tok.eos_token_id:
        assert run_on.shape[1] == ids.shape[1] + 5 and run_on[0, ids.shape[1]] == end

    digit = tok.convert_tokens_to_ids("7")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # the weights as saved
    model.generation_config.eos_token_id = [digit]
    first_token_as(model, ids, digit)
    assert evaluate.generate(model, tok, example, 5, 1) == ["7"]
