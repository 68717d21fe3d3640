"""Statistical mode of ``e2u regress``: a run from another machine against the leaderboard,
document by document.

Across machines (another CPU, a GPU, another BLAS) floating-point sums differ in their last bits,
and a greedy answer on a near-tie can flip, so numbers cannot be compared to 1e-6. The leaderboard
keeps every run's per-document scores (``<board>.docs.json`` beside the YAML); a fresh run is paired
with them over the same documents, and a metric fails only when the paired-bootstrap interval
(99%) of the mean difference lies entirely on the *worse* side of zero **and** the mean difference
is worse than a practical margin. Better numbers never fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e2u_experiments.estimates import paired_interval
from e2u_experiments.runs import Run, split_of
from e2u_tasks.errors import E2UError

DOCS_FORMAT = "e2u-leaderboard-docs/1"
LEVEL = 0.99
ITERS = 2000
# The smallest worsening of a metric's mean that counts as a regression. One flipped greedy
# answer among 40 documents moves a ROUGE-1 or refusal mean by 1/40; the margins sit above that.
MARGINS = {"rouge1_recall": 0.05, "hit_rate": 0.05, "mrr": 0.05, "prob": 0.02, "refusal_rate": 0.05,
           "entity_mention": 0.05, "answer_leak": 0.05, "composite": 0.1,
           # other benchmarks' multiple-choice accuracy (mmlu, hellaswag, e2u_general_mc)
           "acc": 0.05, "acc_norm": 0.05,
           # the logit lens: lens_mrr, and lens_hit@k for every k (LENS_HIT)
           "lens_mrr": 0.05}
LENS_HIT = "lens_hit@"
LENS_HIT_MARGIN = 0.05


def margin_of(metric: str) -> float | None:
    """The practical margin of a metric; None for metrics statistical mode does not pair."""
    if metric.startswith(LENS_HIT):
        return LENS_HIT_MARGIN
    return MARGINS.get(metric)


def docs_path(board: str | Path) -> Path:
    """``leaderboards/x.yaml`` -> ``leaderboards/x.docs.json``."""
    board = Path(board)
    return board.with_name(f"{board.stem}.docs.json")


def entry_id(identity_key: str) -> str:
    return hashlib.sha256(identity_key.encode()).hexdigest()[:16]


def per_document(run: Run) -> dict[str, dict[str, list]]:
    """task -> {"docs": [dataset row of each document], metric: [score of each document]}."""
    tables = {}
    for task, rows in sorted(run.samples.items()):
        if not rows:
            continue
        table: dict[str, list] = {"docs": [r["index"] if r.get("index") is not None else r["doc_id"]
                                           for r in rows]}
        for metric in sorted({m for r in rows for m in r if margin_of(m) is not None}):
            if all(metric in r for r in rows):
                table[metric] = [round(float(r[metric]), 8) for r in rows]
        if len(table) > 1:
            tables[task] = table
    return tables


def write_docs(path: Path, tables: dict[str, dict]) -> None:
    """The per-document scores of every entry (``entry id -> task -> table``), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"format": DOCS_FORMAT, "entries": tables}, separators=(",", ":")),
                   encoding="utf-8")
    os.replace(tmp, path)


def load_docs(board: str | Path) -> dict[str, dict]:
    path = docs_path(board)
    if not path.is_file():
        raise E2UError(f"leaderboard {board} has no per-document scores ({path} is missing), which "
                       "statistical mode needs; write the leaderboard with e2u leaderboard from "
                       "results run with --log_samples, or use --mode exact")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise E2UError(f"per-document scores {path} cannot be read as JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != DOCS_FORMAT or not isinstance(data.get("entries"), dict):
        raise E2UError(f"per-document scores {path}: expected format {DOCS_FORMAT!r} with 'entries'")
    return data["entries"]


def higher_is_better(task: str, metric: str) -> bool:
    """Forget and rephrase tasks: less knowledge and more refusal is better; retain tasks (and
    their parts): the reverse. A task's composite, and another benchmark's accuracy, is always
    better higher."""
    split = split_of(task)
    if metric == "composite" or split is None:
        return True
    forgetting = split in ("forget", "rephrase")
    return (metric == "refusal_rate") == forgetting


def unpaired_metrics(entry_metrics: dict, want: dict[str, dict]) -> list[str]:
    """``task/metric`` of a leaderboard entry that statistical mode cannot pair document by
    document (no per-document scores: a group such as ``mmlu``, a metric without a margin, results
    written without --log_samples). A group's composite is left out: its forget and retain
    shares are paired."""
    return [f"{task}/{metric}" for task, values in sorted(entry_metrics.items()) for metric in values
            if metric not in (want.get(task) or {}) and metric != "composite"]


@dataclass
class Comparison:
    task: str
    metric: str
    expected: float
    got: float
    low: float
    high: float
    margin: float
    worse: bool

    @property
    def diff(self) -> float:
        return self.got - self.expected


def compare(want: dict[str, dict], run: Run, what: str, margin: float | None = None) -> list[Comparison]:
    """Every metric with per-document scores of a leaderboard entry (``want``), paired with the
    run's documents; ``what`` names the run in errors."""
    have = per_document(run)
    comparisons = []
    for task, table in sorted(want.items()):
        mine = have.get(task)
        if mine is None:
            raise E2UError(f"{what}: the results have no per-document scores of {task} (statistical "
                           "mode needs lm_eval --log_samples), or use --mode exact")
        if sorted(map(str, mine["docs"])) != sorted(map(str, table["docs"])):
            common = len(set(map(str, mine["docs"])) & set(map(str, table["docs"])))
            raise E2UError(f"{what}: {task} evaluates other documents than the leaderboard "
                           f"({len(mine['docs'])} vs {len(table['docs'])}, {common} in common); "
                           "pass the same dataset/forget_* args and --limit")
        order = {str(d): i for i, d in enumerate(mine["docs"])}
        for metric in (m for m in table if m != "docs" and m in mine):
            comparisons.append(_compare_metric(task, metric, table, mine, order, margin, what))
    return comparisons


def _compare_metric(task, metric, table, mine, order, margin, what) -> Comparison:
    expected = np.array(table[metric], dtype=float)
    got = np.array([mine[metric][order[str(d)]] for d in table["docs"]], dtype=float)
    diffs = got - expected
    low, high = paired_interval(diffs, ITERS, f"{what}|{task}|{metric}", LEVEL)
    allowed = margin_of(metric) if margin is None else margin
    worse_sign = -1.0 if higher_is_better(task, metric) else 1.0  # the sign of a worsening
    beyond_zero = low > 0 if worse_sign > 0 else high < 0
    worse = bool(beyond_zero and worse_sign * float(diffs.mean()) > allowed)
    return Comparison(task, metric, float(expected.mean()), float(got.mean()), low, high, allowed, worse)


def fingerprint_differences(want: Any, got: Any) -> list[str] | None:
    """The fields in which two fingerprints differ; None when either run has none (a leaderboard
    written before fingerprints: it is compared with its own stored tolerances)."""
    if not isinstance(want, dict) or not isinstance(got, dict):
        return None
    return [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
