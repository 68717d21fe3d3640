"""Every architecture family on a tiny random model: module paths from the config alone, the
locate-and-edit identities in both weight orientations (nn.Linear and GPT-2's Conv1D), the fast
v* engine against the classic reference, GRACE/WISE acting in generation, save/reload, and
every method through the stock CLI or the E2ULM constructor with no module path given."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from e2u_models.architectures import FAMILIES, family_of, layer_template, out_in_weight
from e2u_models.editing.keys import read_at_keys
from e2u_models.editing.nullspace import null_space_projector
from e2u_models.editing.requests import KeySpec, prepare_requests
from e2u_models.editing.stats import StatsSpec, statistics_for
from e2u_models.editing.vstar import VStarSettings, optimise_targets
from e2u_models.hparams import load_hparams
from e2u_models.methods import alphaedit, get_method, grace, memit, rome, wise
from e2u_models.protocol import EditRequest
from e2u_tasks.errors import E2UError
from tests.families import FAMILY_NAMES, build_family_model

QUESTIONS = ["Who wrote the play about two young lovers?", "What is the capital of France?"]
EDIT = {"v_num_grad_steps": 6, "v_lr": 1.0, "clamp_norm_factor": 10.0, "context_template_length_params": [],
        "stats_corpus": "python-docs", "mom2_n_tokens": 300, "layers": [2]}


def requests(env):
    return [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I don't know.")
            for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def models(tokenizer):
    """One fresh copy per call of each family's tiny model (built once)."""
    import copy

    built = {}

    def get(family):
        if family not in built:
            built[family] = build_family_model(family, tokenizer)
        return copy.deepcopy(built[family])

    return get


def method_hparams(method, config, **overrides):
    return load_hparams(get_method(method).HyperParams, method, None, {**EDIT, **overrides}, config=config)


def test_every_named_family_is_in_the_table_and_its_paths_exist(models):
    for family in FAMILY_NAMES:
        assert family in FAMILIES
        model = models(family)
        names = dict(model.named_modules())
        entry = family_of(model.config)
        for template in (entry.layers, entry.mlp_out):
            assert template.format(3) in names, (family, template)
        assert entry.final_norm in names and entry.embeddings in names and entry.head in names
        assert names[entry.head] is model.get_output_embeddings()
        leaves = {n.rsplit(".", 1)[-1] for n in names}
        assert set(entry.lora_targets) <= leaves, family


def test_layer_placeholders_that_need_no_braces():
    assert layer_template("transformer.h.N.mlp.c_proj", "x") == "transformer.h.{}.mlp.c_proj"
    assert layer_template("model.layers.%d", "x") == "model.layers.{}"
    assert layer_template("model.layers.{}", "x") == "model.layers.{}"
    with pytest.raises(E2UError, match="exactly one layer placeholder"):
        layer_template("model.layers.0.mlp.down_proj", "rewrite_module_tmp")


def quick(families):
    """Families run in the default suite (the rest are marked slow: each takes seconds)."""
    return [pytest.param(f, marks=() if f in families else (pytest.mark.slow,)) for f in FAMILY_NAMES]


@pytest.mark.parametrize("family", quick(("llama", "gpt2", "gemma2", "gpt_neox")))
def test_locate_and_edit_identities(family, models, tokenizer, env, tmp_path):
    """ROME: W'k* = v* (the edited module's output at the key is the optimised value); MEMIT:
    ΔW (λC + KᵀK) = Rᵀ K; AlphaEdit: (P KᵀK + L2·I) ΔWᵀ = P Kᵀ R and ΔW (I − P) = 0; fast v*
    equals the classic reference. ΔW is read in [out, in] orientation whatever the storage."""
    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    model = models(family)
    config = model.config
    forget = requests(env)
    # ROME on the first request: the module's output at k* becomes v0 + δ.
    hp = method_hparams("rome", config)
    module = hp.rewrite_module_tmp.format(2)
    prepared = prepare_requests(model, tokenizer, forget[:1], KeySpec.of(hp), env, seed=0)
    fast = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), 2, module)
    classic = optimise_targets(model, tokenizer, prepared,
                               dataclasses.replace(VStarSettings.of(hp), mode="classic"), 2, module)
    torch.testing.assert_close(fast.deltas, classic.deltas, atol=2e-4, rtol=2e-3)
    edited = models(family)
    report = rome.apply(edited, tokenizer, forget[:1], None, hp, seed=0, env=env)
    assert report.details["architecture"]["family"] == family
    after = read_at_keys(edited, tokenizer, [prepared[0].key_rows(0)[0]], {module: "output"})[module]
    torch.testing.assert_close(after[0], fast.targets[0], atol=2e-3, rtol=2e-3)

    # MEMIT and AlphaEdit on layer 2 alone: K, R, C recomputed here; ΔW read from the weights.
    hp = method_hparams("memit", config, mom2_update_weight=100.0)
    layer_module = hp.layer_module_tmp.format(2)
    prepared = prepare_requests(model, tokenizer, forget, KeySpec.of(hp), env, seed=0)
    rows = [p.key_rows(i)[0] for i, p in enumerate(prepared)]
    read = read_at_keys(model, tokenizer, rows, {module: "input", layer_module: "output"})
    keys, current = read[module].double(), read[layer_module].double()
    targets = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), 2, layer_module).targets.double()
    residual = targets - current
    moment = statistics_for(model, tokenizer, StatsSpec.of(hp), [2], env)[0][2].double()
    w0 = out_in_weight(dict(model.named_modules())[module]).detach().double()

    def update_of(method, hparams):
        edited = models(family)
        method.apply(edited, tokenizer, forget, None, hparams, seed=0, env=env)
        return out_in_weight(dict(edited.named_modules())[module]).detach().double() - w0

    delta = update_of(memit, hp)
    lhs, rhs = delta @ (100.0 * moment + keys.T @ keys), residual.T @ keys
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-3
    hp = method_hparams("alphaedit", config, nullspace_threshold=0.5, nullspace_rule="relative")
    delta = update_of(alphaedit, hp)
    projector, kept = null_space_projector(moment, 0.5, "relative")
    assert 0 < kept < moment.shape[0]
    lhs = (projector @ keys.T @ keys + hp.L2 * torch.eye(moment.shape[0], dtype=torch.float64)) @ delta.T
    rhs = projector @ keys.T @ residual
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-3
    assert float((delta @ (torch.eye(moment.shape[0], dtype=torch.float64) - projector)).norm()) \
        < 1e-4 * float(delta.norm())


def greedy(model, tokenizer, prompt_ids, tokens=4):
    from e2u_models.nethook import pad_id_of
    from e2u_models.shared_prefix import continue_greedily

    return continue_greedily(model, [prompt_ids], pad_id_of(tokenizer), tokens, lambda _r, _t: False)[0]


@pytest.mark.parametrize("family", quick(("gpt2", "gemma2")))
def test_grace_and_wise_act_in_generation_and_survive_save_reload(family, models, tokenizer, env, tmp_path):
    """GRACE makes the edited prompt generate the target's first token (KV-cached, shared-prefix decoding); WISE
    lowers the target NLL and changes the logits generation starts from; a model edited by ROME then
    GRACE, saved with its codebook and loaded again, gives the same logits."""
    from e2u_models.editing.adapters import load_adapters
    from e2u_models.saving import save_edited_model

    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    forget = requests(env)[:1]
    prompt = env.encode(forget[0].prompt)
    target = env.encode(forget[0].target)
    model = models(family)
    hp = load_hparams(grace.HyperParams, "grace", None, {"layer": 2, "n_iter": 40}, config=None)
    rome.apply(model, tokenizer, forget, None, method_hparams("rome", model.config, v_num_grad_steps=3),
               seed=0, env=env)
    report = grace.apply(model, tokenizer, forget, None, hp, seed=0, env=env)  # paths from the model
    if family_of(model.config).residual_mlp:  # the codebook fires at the prompt's last token
        assert greedy(model, tokenizer, prompt)[0] == target[0]
    else:  # a normalised MLP output bounds what one position's value can do (docs/architectures.md)
        verification = report.details["verification"]
        assert verification["mean_nll_after"] < verification["mean_nll_before"] - 0.05
        assert report.details["architecture"]["fallbacks"]

    folder = save_edited_model(model, tokenizer, tmp_path / "saved", {"method": "rome+grace"}, log=lambda *_: None)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    load_adapters(reloaded, folder)
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)

    model = models(family)
    with torch.no_grad():
        plain_logits = model(torch.tensor([prompt])).logits[0, -1]
    hp = load_hparams(wise.HyperParams, "wise", None, {"layer": 2, "n_iter": 30, "irrelevant_per_edit": 2,
                                                       "irrelevant_answer_tokens": 0}, config=model.config)
    report = wise.apply(model, tokenizer, forget, None, hp, seed=0, env=env)
    verification = report.details["verification"]
    assert verification["mean_nll_after"] < verification["mean_nll_before"]
    with torch.no_grad():  # the side memory changes the first generation step's logits
        assert not torch.allclose(model(torch.tensor([prompt])).logits[0, -1], plain_logits, atol=1e-4)


# One CLI run per family, the methods spread over the families so the CLI sees all ten; quick
# settings, no module path. The full matrix (every method on every family) is the slow test below.
CLI_METHOD = {"gpt2": "memit", "gpt_neox": "rome", "gptj": "alphaedit", "qwen2": "grace", "qwen3": "wise",
              "gemma2": "gd", "phi3": "dpo", "olmo2": "kl", "mistral": "ga", "gemma": "rome", "llama": "none"}
QUICK = {"rome": "layers=2,v_num_grad_steps=3,mom2_n_tokens=500,stats_corpus=python-docs",
         "memit": "layers=1;2,v_num_grad_steps=3,mom2_n_tokens=500,stats_corpus=python-docs",
         "alphaedit": "layers=1;2,v_num_grad_steps=3,mom2_n_tokens=500,stats_corpus=python-docs,"
                      "nullspace_rule=relative,nullspace_threshold=0.5",
         "grace": "n_iter=5", "wise": "n_iter=5,irrelevant_answer_tokens=0",
         **{m: "max_steps=2" for m in ("ga", "gd", "kl", "dpo")}, "none": ""}


@pytest.fixture(scope="module")
def family_dirs(tokenizer, tmp_path_factory):
    def folder(family):
        path = tmp_path_factory.getbasetemp() / f"family-{family}"
        if not path.exists():
            build_family_model(family, tokenizer).save_pretrained(path)
            tokenizer.save_pretrained(path)
        return str(path)

    return folder


@pytest.mark.parametrize("family", quick(("gpt2",)))
def test_stock_cli_with_no_module_path(family, family_dirs, tmp_path):
    from tests.test_cli import LM_EVAL, results_of, run

    method = CLI_METHOD[family]
    extra = f",{QUICK[method]}" if QUICK[method] else ""
    out = tmp_path / "out"
    proc = run([LM_EVAL, "--model", "e2u", "--model_args",
                f"pretrained={family_dirs(family)},method={method},dataset=tofu_factual,forget_size=2{extra}",
                "--tasks", "tofu_forget", "--limit", "2", "--device", "cpu", "--output_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    e2u = results_of(out)["config"]["e2u"]
    assert e2u["method"] == method
    if method != "none":
        assert e2u["method_report"]["details"]["architecture"]["family"] == family


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_method_through_the_constructor(family, family_dirs):
    """E2ULM(pretrained=<folder>, method=<m>) with quick settings and no module path."""
    from e2u_models.model import E2ULM

    for method in ("none", "rome", "memit", "alphaedit", "grace", "wise", "ga", "gd", "kl", "dpo"):
        settings = dict(item.split("=", 1) for item in QUICK[method].split(",") if item)
        lm = E2ULM(pretrained=family_dirs(family), method=method, device="cpu", batch_size=4,
                   dataset="tofu_factual", forget_size="2", **settings)
        report = lm.prepared.method_report
        assert report.method == method, (family, method)


def test_unknown_family_is_one_line_naming_the_fields(tokenizer, tmp_path):
    import types

    from e2u_models.architectures import fill_from_family

    values = {}
    with pytest.raises(E2UError, match="rewrite_module_tmp, layer_module_tmp to this model's module paths"):
        fill_from_family(rome.HyperParams, values, {}, types.SimpleNamespace(model_type="opt"))
    values = {"rewrite_module_tmp": "model.decoder.layers.N.fc2", "layer_module_tmp": "model.decoder.layers.%d"}
    fill_from_family(rome.HyperParams, values, {}, types.SimpleNamespace(model_type="opt"))
    assert values["rewrite_module_tmp"] == "model.decoder.layers.{}.fc2"
