"""Hparams resolved once: base file, preset (``base:`` + what differs), model args; where each
value came from is in the results; field rules (choices, ranges) are one-line errors."""

import dataclasses

import pytest
import yaml

from e2u_models.hparams import (PRESET_META_KEYS, file_layers, has_presets, load_hparams,
                                preset_files, resolve_hparams)
from e2u_models.methods import METHODS, get_method, gd, rome
from e2u_models.model import E2ULM
from e2u_models.training.finetune import HPARAMS_NAME as FINETUNE
from e2u_models.training.finetune import FinetuneHParams
from e2u_tasks.errors import E2UError


def hparams_class(method):
    return FinetuneHParams if method == FINETUNE else get_method(method).HyperParams


def test_results_name_where_each_hparam_came_from(tiny_model_dir, tmp_path):
    lm = E2ULM(pretrained=tiny_model_dir, method="gd", hparams="smollm2-135m", epochs=1,
               forget_size=2, device="cpu", batch_size=4, cache_dir=str(tmp_path))
    info = lm.get_model_info()["e2u"]
    sources = info["hparams_sources"]
    assert sources["epochs"] == "model args" and info["hparams"]["epochs"] == 1
    assert sources["lr"] == "hparams/gd/smollm2-135m.yaml" and info["hparams"]["lr"] == 5e-5
    assert sources["train_batch_size"] == "hparams/gd.yaml"
    assert sources["train_from_layer"] == "default"
    assert set(sources) == set(info["hparams"])
    assert info["hparams_source"].endswith("gd/smollm2-135m.yaml")


def test_a_preset_with_base_inherits_the_base_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: rome\nv_lr: 0.1\n")
    resolved = resolve_hparams(rome.HyperParams, "rome", str(path), {"kl_factor": 0.5})
    base = load_hparams(rome.HyperParams, "rome")
    assert resolved.values.v_lr == 0.1 and resolved.sources["v_lr"] == str(path)
    assert resolved.values.context_template_length_params == base.context_template_length_params
    assert resolved.sources["context_template_length_params"] == "hparams/rome.yaml"
    assert resolved.sources["kl_factor"] == "model args" and resolved.sources["target_eos"] == "default"
    assert resolved.path == str(path)


def test_an_unknown_base_is_a_one_line_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: nope\n")
    with pytest.raises(E2UError, match=r"base='nope' is not accepted; use one of .*rome"):
        load_hparams(rome.HyperParams, "rome", str(path))


@pytest.mark.parametrize("method", [*METHODS, FINETUNE])
def test_shipped_presets_list_only_what_differs_from_their_base(method):
    cls = hparams_class(method)
    presets = preset_files(method)
    for name, path in presets.items():
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        # a model preset changes the method's file; a model-and-dataset preset changes a model preset
        assert raw["base"] == method or raw["base"].removeprefix(f"{method}/") in presets, name
        base_path = None if raw["base"] == method else str(presets[raw["base"].removeprefix(f"{method}/")])
        base = dataclasses.asdict(load_hparams(cls, method, base_path))
        assert [source for source, _ in file_layers(method, str(path))][-1] == path
        resolved = dataclasses.asdict(load_hparams(cls, method, str(path)))
        for key in set(raw) - set(PRESET_META_KEYS):
            assert resolved[key] != base[key], (name, key)


def test_model_presets_are_an_explicit_folder():
    assert has_presets("rome") and has_presets("gd") and has_presets(FINETUNE)
    assert not has_presets("none")


@pytest.mark.parametrize("overrides, message", [
    ({"precision": "fp8"}, "hparam precision='fp8' is not accepted; use one of auto, fp32, bf16, fp16"),
    ({"warmup_ratio": 1}, r"hparam warmup_ratio=1.0 must be in \[0, 1\)"),
    ({"epochs": 0}, "hparam epochs=0 must be >= 1"),
    ({"forget_weight": -1}, "hparams forget_weight and retain_weight must be >= 0"),
])
def test_field_rules_are_one_line_errors(overrides, message):
    with pytest.raises(E2UError, match=f"^{message}$"):
        load_hparams(gd.HyperParams, "gd", None, overrides)


def test_a_subclass_that_changes_a_default_keeps_the_field_rule():
    with pytest.raises(E2UError, match=r"^hparam lr=-1.0 must be > 0 \(e.g. lr=1e-5\)$"):
        load_hparams(FinetuneHParams, FINETUNE, None, {"lr": -1})
    with pytest.raises(E2UError, match=r"^hparam v_mode='slow' is not accepted; use fast or classic$"):
        load_hparams(rome.HyperParams, "rome", None, {"v_mode": "slow"})


@pytest.mark.parametrize("value, rule, message", [
    (5, {"min": 0, "range": "[0, 1]"}, "hparam x=5 must be in [0, 1]"),
    (-1, {"min": 0, "range": "[-2, 1]"}, "hparam x=-1 must be >= 0"),
    (float("inf"), {"above": 0, "finite": True}, "hparam x=inf must be > 0"),
])
def test_every_declared_rule_of_a_field_is_checked(value, rule, message):
    from e2u_models.hparams import check_field

    with pytest.raises(E2UError) as info:
        check_field("x", value, rule)
    assert str(info.value) == message


@pytest.mark.parametrize("given,expected", [(2, [2]), ("2", [2]), ("4;5", [4, 5]), ("[1, 2]", [1, 2])])
def test_a_list_hparam_takes_one_value_or_several(given, expected):
    """lm-eval reads `layers=2` as the number 2: one layer, not an error."""
    from e2u_models.hparams import load_hparams
    from e2u_models.methods import memit

    assert load_hparams(memit.HyperParams, "memit", None, {"layers": given}).layers == expected


def test_a_list_hparam_says_what_it_accepts():
    from e2u_models.hparams import load_hparams
    from e2u_models.methods import rome
    from e2u_tasks.errors import E2UError

    with pytest.raises(E2UError, match=r"layers=\{'a': 1\} is not a list; give one value, values separated by ';'"):
        load_hparams(rome.HyperParams, "rome", None, {"layers": {"a": 1}})
