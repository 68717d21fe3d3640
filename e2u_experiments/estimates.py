"""Numbers with uncertainty: bootstrap confidence intervals over documents, spread over seeds.

Per run, the documents of each split are resampled with replacement (``iters`` times, numpy's
PCG64 seeded by the report seed and the run's identity, so a number's interval does not depend on
which other runs are in the folder); every metric of a split uses the same resamples. The
composite resamples forget and retain independently; the rephrase increase resamples forget /
rephrase *pairs* (same dataset row). Intervals are 95% percentile intervals. Without the
per-document samples (no ``--log_samples``) the interval is the normal approximation from
lm-eval's standard error, marked as such.

Several seeds: the value is the mean over seeds, ``sd`` the standard deviation across seeds, and
the interval is the percentile interval of the mean of the seeds' bootstrap replicates.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from e2u_experiments.runs import Run, stderr_name

LEVEL = 0.95
Z = 1.959963984540054


@dataclass
class Estimate:
    value: float
    low: float | None = None
    high: float | None = None
    sd: float | None = None
    seeds: int = 1
    kind: str = "bootstrap"  # or "normal" (from lm-eval's stderr) or "none"

    def cell(self, signed: bool = False) -> str:
        fmt = "{:+.3f}" if signed else "{:.3f}"
        text = fmt.format(self.value)
        if self.sd is not None:
            text += f" ± {self.sd:.3f}"
        if self.low is not None and self.high is not None:
            mark = "≈" if self.kind == "normal" else ""
            text += f" [{mark}{self.low:.3f}, {self.high:.3f}]"
        return text


def _rng(seed: int, run: Run, what: str) -> np.random.Generator:
    key = json.dumps([seed, run.identity(), what], sort_keys=True, default=str)
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


class RunBootstrap:
    """Bootstrap replicates of one run's split means (and derived quantities)."""

    def __init__(self, run: Run, iters: int, seed: int) -> None:
        self.run, self.iters, self.seed = run, iters, seed
        self._cache: dict[tuple, np.ndarray | None] = {}

    def _docs(self, split: str) -> list[dict] | None:
        task = self.run.task_for(split)
        rows = self.run.samples.get(task or "")
        return rows or None

    def _indices(self, split: str, n: int) -> np.ndarray:
        key = ("idx", split)
        if key not in self._cache:
            self._cache[key] = _rng(self.seed, self.run, split).integers(0, n, size=(self.iters, n))
        return self._cache[key]

    def replicates(self, split: str, metric: str) -> np.ndarray | None:
        """Resampled means of ``metric`` over the split's documents, or None without samples."""
        docs = self._docs(split)
        if docs is None or any(metric not in d for d in docs):
            return None
        values = np.array([d[metric] for d in docs], dtype=float)
        return values[self._indices(split, len(values))].mean(axis=1)

    def composite(self) -> np.ndarray | None:
        forget = self.replicates("forget", "rouge1_recall")
        retain = self.replicates("retain", "rouge1_recall")
        return None if forget is None or retain is None else 1.0 - forget + retain

    def rephrase_increase(self, metric: str) -> np.ndarray | None:
        """Resampled mean(rephrase - forget) over rows present in both (paired by dataset row)."""
        forget, rephrase = self._docs("forget"), self._docs("rephrase")
        if forget is None or rephrase is None:
            return None
        by_row = {d["index"]: d for d in forget if d.get("index") is not None}
        pairs = [(by_row[d["index"]][metric], d[metric]) for d in rephrase
                 if d.get("index") in by_row and metric in d and metric in by_row[d["index"]]]
        if not pairs:
            return None
        diffs = np.array([r - f for f, r in pairs], dtype=float)
        idx = _rng(self.seed, self.run, f"pairs:{metric}").integers(0, len(diffs), size=(self.iters, len(diffs)))
        return diffs[idx].mean(axis=1)


    def task_values(self, task: str, metric: str) -> dict | None:
        """doc id -> ``metric`` of another benchmark's documents (mmlu, e2u_general_mc), or None
        without per-document samples of it."""
        docs = self.run.samples.get(task)
        if not docs or any(metric not in d for d in docs):
            return None
        return {d["doc_id"]: d[metric] for d in docs}

    def task_replicates(self, task: str, metric: str) -> np.ndarray | None:
        """Resampled means of another benchmark's metric over its documents."""
        values = self.task_values(task, metric)
        if values is None:
            return None
        array = np.array([values[k] for k in sorted(values)], dtype=float)
        idx = _rng(self.seed, self.run, f"task:{task}").integers(0, len(array), size=(self.iters, len(array)))
        return array[idx].mean(axis=1)

    def task_change(self, base: RunBootstrap, task: str, metric: str) -> np.ndarray | None:
        """Resampled mean(this run - ``base`` run) of another benchmark's metric, paired by
        document (both runs evaluated the same documents), or None unless both have them."""
        mine, theirs = self.task_values(task, metric), base.task_values(task, metric)
        if mine is None or theirs is None or set(mine) != set(theirs):
            return None
        diffs = np.array([mine[k] - theirs[k] for k in sorted(mine)], dtype=float)
        idx = _rng(self.seed, self.run, f"change:{task}").integers(0, len(diffs), size=(self.iters, len(diffs)))
        return diffs[idx].mean(axis=1)


def _percentiles(replicates: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - LEVEL) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def combine(values: list[float], replicates: list[np.ndarray | None],
            stderrs: list[float | None], bounds: tuple[float, float] | None = (0.0, 1.0)) -> Estimate | None:
    """One estimate from one run per seed: mean, spread across seeds, interval (a normal
    interval is clipped to the quantity's ``bounds``)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    if replicates and all(r is not None for r in replicates):
        low, high = _percentiles(np.mean(np.stack(replicates), axis=0))
        return Estimate(mean, low, high, sd, len(values), "bootstrap")
    errors = [s for s in stderrs if s is not None and not math.isnan(s)]
    if len(errors) == len(values):
        se = math.sqrt(sum(s * s for s in errors)) / len(errors)  # of the mean of independent runs
        low, high = mean - Z * se, mean + Z * se
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        return Estimate(mean, low, high, sd, len(values), "normal")
    return Estimate(mean, None, None, sd, len(values), "none")


def split_metric(runs: list[Run], boots: list[RunBootstrap], split: str, metric: str) -> Estimate | None:
    return combine([r.split_value(split, metric) for r in runs],
                   [b.replicates(split, metric) for b in boots],
                   [r.split_value(split, f"{metric}_stderr") for r in runs])


def composite(runs: list[Run], boots: list[RunBootstrap]) -> Estimate | None:
    stderrs = []
    for run in runs:
        group = run.group()
        stderrs.append(run.value(group, "composite_stderr") if group else None)
    return combine([r.composite() for r in runs], [b.composite() for b in boots], stderrs, (0.0, 2.0))


def _bounds(metric: str) -> tuple[float, float] | None:
    """Accuracies lie in [0, 1]; another benchmark's other metrics may not."""
    return (0.0, 1.0) if metric.partition(",")[0] in ("acc", "acc_norm") else None


def task_metric(runs: list[Run], boots: list[RunBootstrap], task: str, metric: str) -> Estimate | None:
    """Another benchmark's metric (``mmlu`` acc, ``hellaswag`` acc_norm) of one table row."""
    return combine([r.value(task, metric) for r in runs], [b.task_replicates(task, metric) for b in boots],
                   [r.value(task, stderr_name(metric)) for r in runs], _bounds(metric))


def task_change(runs: list[Run], boots: list[RunBootstrap], base_runs: list[Run],
                base_boots: list[RunBootstrap], task: str, metric: str) -> Estimate | None:
    """Change of another benchmark's metric against ``base`` (the ``none`` row of the block),
    each run paired with the base run of its seed (or the only base run): a paired bootstrap
    over documents with per-document samples, else a normal interval from both standard errors
    (as if independent, so wider than the paired one)."""
    by_seed = {r.seed: i for i, r in enumerate(base_runs)}
    values, replicates, stderrs = [], [], []
    for run, boot in zip(runs, boots):
        j = by_seed.get(run.seed, 0 if len(base_runs) == 1 else None)
        if j is None:
            continue
        got, want = run.value(task, metric), base_runs[j].value(task, metric)
        if got is None or want is None:
            continue
        values.append(got - want)
        replicates.append(boot.task_change(base_boots[j], task, metric))
        errors = [r.value(task, stderr_name(metric)) for r in (run, base_runs[j])]
        stderrs.append(None if any(e is None or math.isnan(e) for e in errors)
                       else math.sqrt(sum(e * e for e in errors)))
    return combine(values, replicates, stderrs, None) if values else None


def rephrase_increase(runs: list[Run], boots: list[RunBootstrap], metric: str) -> Estimate | None:
    values = []
    for run in runs:
        forget, rephrase = run.split_value("forget", metric), run.split_value("rephrase", metric)
        values.append(None if forget is None or rephrase is None else rephrase - forget)
    # No stderr of a difference of paired means can be had from the aggregate file: samples or none.
    return combine(values, [b.rephrase_increase(metric) for b in boots], [None] * len(runs), None)



def paired_interval(diffs: np.ndarray, iters: int, key: str, level: float) -> tuple[float, float]:
    """Percentile interval at ``level`` of the mean of paired per-document differences: the same
    documents resampled on both sides (numpy's PCG64 seeded by ``key``, so it is reproducible)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    means = diffs[rng.integers(0, len(diffs), size=(iters, len(diffs)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
