"""The committed SmolLM2 leaderboard as a user's CI meets it: fresh runs on whatever machine runs
the tests, compared with ``leaderboards/smollm2-135m.yaml``.

- default suite: a fresh ``none`` and ``memit`` (tofu_factual, 40 forget rows, seed 0, the stock
  ``lm_eval`` CLI with ``--log_samples``) pass statistical mode on any machine, and exact mode
  where the environment fingerprint matches the leaderboard's; halving their retain ROUGE-1 fails,
  one flipped answer does not;
- ``slow``: genuine regressions fail statistical mode — MEMIT with its layers moved to the last
  five, GD with one epoch instead of four (it loses retain) — each run as the plain entry it pretends to be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2u_experiments.cli import main
from e2u_experiments.statistical import fingerprint_differences
from tests.conftest import REPO
from tests.test_cli import LM_EVAL, run
from tests.test_end_to_end import needs_smollm2

BOARD = REPO / "leaderboards" / "smollm2-135m.yaml"


def run_smollm2(out: Path, method_args: str) -> Path:
    """One leaderboard-shaped run through the stock CLI; returns its output folder."""
    proc = run([LM_EVAL, "--model", "e2u", "--model_args",
                f"pretrained=smollm2-135m-instruct,dataset=tofu_factual,forget_size=40,seed=0,{method_args}",
                "--tasks", "tofu_factual", "--device", "cpu", "--log_samples", "--output_path", str(out)],
               timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def regress(capsys, folder: Path, *extra: str) -> tuple[int, str]:
    code = main(["regress", "--leaderboard", str(BOARD), "--results", str(folder), "--allow-missing", *extra])
    return code, capsys.readouterr().out


def board_entry(method: str) -> dict:
    """The board's plain entry of ``method`` on the split these tests run (TOFU, seed 0)."""
    board = yaml.safe_load(BOARD.read_text())
    return next(e for e in board["entries"] if e["method"] == method and not e["options"]
                and e.get("dataset") == "tofu_factual" and e.get("forget_seed", 0) == 0)


def as_plain_run(folder: Path, *given: str) -> None:
    """Drop hparams given on the command line from the results' model_args, so the run stands for
    the plain entry (as if a code change, not the user, had moved them)."""
    path = next(folder.rglob("results_*.json"))
    data = json.loads(path.read_text())
    args = data["config"]["model_args"]
    if isinstance(args, str):
        data["config"]["model_args"] = ",".join(p for p in args.split(",") if p.split("=")[0] not in given)
    else:
        data["config"]["model_args"] = {k: v for k, v in args.items() if k not in given}
    path.write_text(json.dumps(data))


def scale_retain_rouge(folder: Path, factor: float, only_doc: int | None = None) -> None:
    """Multiply tofu_retain's per-document ROUGE-1 (and its mean) in a copy of a run."""
    samples = next(folder.rglob("samples_tofu_retain_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows:
        if only_doc is None or row["doc_id"] == only_doc:
            row["rouge1_recall"] *= factor
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = next(folder.rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"]["tofu_retain"]["rouge1_recall,none"] = sum(r["rouge1_recall"] for r in rows) / len(rows)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh")
    run_smollm2(root / "none", "method=none")
    run_smollm2(root / "memit", "method=memit")
    return root


@needs_smollm2
def test_fresh_none_and_memit_pass_the_committed_leaderboard(fresh, capsys):
    code, out = regress(capsys, fresh, "--mode", "statistical")
    assert code == 0, out
    assert "2 run(s) in statistical mode: none of" in out
    # auto: exact where this machine's fingerprint is the leaderboard's, statistical elsewhere
    code, out = regress(capsys, fresh)
    assert code == 0, out
    mine = json.loads(next((fresh / "none").rglob("results_*.json")).read_text())["config"]["e2u"]["fingerprint"]
    differ = fingerprint_differences(board_entry("none")["run_card"]["fingerprint"], mine)
    if differ:
        assert f"statistical mode (fingerprint differs in {', '.join(differ)})" in out
    else:
        assert "exact mode (fingerprints match)" in out and "2 run(s) within tolerance" in out


@needs_smollm2
def test_halved_retain_fails_and_one_flipped_answer_does_not(fresh, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fresh / "memit", copy / "memit")
    answered = [i for i, r in enumerate(
        json.loads(line) for line in next(copy.rglob("samples_tofu_retain_*.jsonl")).read_text().splitlines())
        if r["rouge1_recall"] > 0]
    scale_retain_rouge(copy / "memit", 0.0, only_doc=answered[0])
    code, out = regress(capsys, copy, "--mode", "statistical")
    assert code == 0, out
    scale_retain_rouge(copy / "memit", 0.5)
    code, out = regress(capsys, copy, "--mode", "statistical")
    assert code == 1
    assert "memit tofu_factual n=40 seed=0 tofu_retain/rouge1_recall" in out.split("metrics worse beyond")[1]


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("method, given, breaks", [
    ("memit", "layers=25;26;27;28;29", "tofu_forget/rouge1_recall"),
    ("gd", "epochs=1", "tofu_retain/rouge1_recall"),
])
def test_a_genuine_regression_fails_statistical_mode(method, given, breaks, tmp_path, capsys):
    folder = run_smollm2(tmp_path / method, f"method={method},{given}")
    as_plain_run(folder, given.split("=")[0])
    code, out = regress(capsys, tmp_path, "--mode", "statistical")
    assert code == 1, out
    worse = out.split("metrics worse beyond")[1]
    assert f"{method} tofu_factual n=40 seed=0 {breaks}" in worse
