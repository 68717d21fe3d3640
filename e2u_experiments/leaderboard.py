"""Leaderboard files and ``e2u regress``: measured numbers frozen with tolerances, checked in CI.

Format (YAML or JSON)::

    format: e2u-leaderboard/1
    name: ...
    note: where and how it was measured, why these tolerances
    entries:
      - model: smollm2-135m-instruct       # what was run (matched exactly against results)
        method: rome
        options: {merge: "5"}              # method options / hparam overrides given
        dataset: tofu_factual
        forget_size: 40
        forget_seed: 0
        seed: 0
        limit: null                        # lm-eval --limit
        run_card: {packages: {...}, hparams_sha256: ..., model_sha256: ..., data_sha256: ...,
                   fingerprint: {device_type, device_name, dtype, torch, ..., threads, ...}}
        metrics:                           # task or group -> metric -> value and tolerance
          tofu_forget: {rouge1_recall: {value: 0.209, tolerance: 1.0e-06}, ...}
          tofu_factual: {composite: {value: 1.064, tolerance: 1.0e-06}}

A result passes when |got - value| <= tolerance (absolute). Run-card differences (package
versions, hparams or model hash, and the environment fingerprint: which device, dtype, software
and thread count wrote the number) are printed as notes: they explain a moved number, they are
not failures by themselves.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2u_experiments.report import method_order
from e2u_experiments.runs import Run, load_runs
from e2u_experiments.statistical import (LEVEL, Comparison, compare, docs_path, entry_id,
                                         fingerprint_differences, load_docs, per_document,
                                         unpaired_metrics, write_docs)
from e2u_tasks.errors import E2UError

FORMAT = "e2u-leaderboard/1"
IDENTITY = ("model", "method", "options", "dataset", "forget_size", "forget_seed", "seed", "limit")
ENTRY_KEYS = set(IDENTITY) | {"metrics", "run_card"}
CARD_KEYS = ("packages", "hparams_sha256", "model_sha256", "model_file_sha256", "data_sha256",
             "fingerprint", "targets")
EXIT_MOVED = 1


def _normal_limit(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def identity_of(run: Run) -> dict[str, Any]:
    return run.identity()


def _identity_key(ident: dict[str, Any]) -> str:
    return json.dumps({k: ident.get(k) for k in IDENTITY}, sort_keys=True, default=str)


def _describe(ident: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted((ident.get("options") or {}).items()))
    text = f"{Path(str(ident['model'])).name} {ident['method']}" + (f" ({opts})" if opts else "")
    text += f" {ident.get('dataset')} n={ident.get('forget_size')} seed={ident.get('seed')}"
    if ident.get("limit") is not None:
        text += f" limit={ident['limit']}"
    return text


# ------------------------------------------------------------------ writing

# Measured tolerances are this many times the largest difference seen between repeats: the repeats
# sample a few batch sizes and processes, not every summation order a machine can take.
TOLERANCE_FACTOR = 10


def measured_tolerances(runs: list[Run], repeats: list[Run]) -> dict[str, dict[str, float]]:
    """metric -> {max_diff, pairs, tolerance}: the largest |difference| of each metric between a
    run and its repeats (same identity: another batch size, another process) on this machine.
    Teacher-forced metrics carry float noise from the batch shape; generated answers do not, so
    their metrics get a tolerance of 0 when no repeat moved them."""
    by_identity = {_identity_key(identity_of(r)): r for r in runs}
    found: dict[str, dict[str, float]] = {}
    for repeat in repeats:
        base = by_identity.get(_identity_key(identity_of(repeat)))
        if base is None:
            raise E2UError(f"repeat {repeat.path} has no run of the same identity among the results "
                           f"({_describe(identity_of(repeat))}); a repeat must re-run a leaderboard run")
        for task, values in repeat.metrics.items():
            for metric, got in values.items():
                want = base.metrics.get(task, {}).get(metric)
                if metric.endswith("_stderr") or want is None or math.isnan(got) or math.isnan(want):
                    continue
                slot = found.setdefault(metric, {"max_diff": 0.0, "pairs": 0})
                slot["max_diff"] = max(slot["max_diff"], abs(got - want))
                slot["pairs"] += 1
    for slot in found.values():
        slot["tolerance"] = float(f"{TOLERANCE_FACTOR * slot['max_diff']:.3g}")
    return dict(sorted(found.items()))


def build_entries(runs: list[Run], tolerance: float,
                  measured: dict[str, dict[str, float]] | None = None) -> list[dict]:
    """One entry per run; each metric's tolerance is the measured one where repeats measured it,
    ``tolerance`` otherwise."""
    measured = measured or {}
    entries = []
    for run in runs:
        metrics = {}
        for task, values in sorted(run.metrics.items()):
            kept = {m: {"value": v, "tolerance": measured[m]["tolerance"] if m in measured else tolerance}
                    for m, v in sorted(values.items()) if not m.endswith("_stderr") and not math.isnan(v)}
            if kept:
                metrics[task] = kept
        card = {k: run.card[k] for k in CARD_KEYS if k in run.card}
        entries.append({**identity_of(run), "run_card": card, "metrics": metrics})
    return sorted(entries, key=_entry_order)


def _entry_order(entry: dict) -> tuple:
    opts = ", ".join(f"{k}={v}" for k, v in sorted((entry.get("options") or {}).items()))
    label = f"{entry['method']} ({opts})" if opts else entry["method"]
    return (str(entry["model"]), str(entry.get("dataset")), entry.get("forget_size") or 0,
            method_order(label), str(entry.get("seed")))


def _kept_entries(update: str, replaced: set[str], log) -> tuple[list[dict], dict[str, dict]]:
    """The entries (and per-document scores) of an existing leaderboard that no new run replaces."""
    board = load_leaderboard(update)
    docs = load_docs(update) if docs_path(update).is_file() else {}
    kept = [e for e in board["entries"] if _identity_key(e) not in replaced]
    log(f"e2u: {len(board['entries']) - len(kept)} entries of {update} replaced by new runs, {len(kept)} kept")
    kept_ids = {entry_id(_identity_key(e)) for e in kept}
    return kept, {key: table for key, table in docs.items() if key in kept_ids}


def write_leaderboard(folders: list[str], out: str, name: str = "", tolerance: float = 1e-6,
                      note: str = "", repeats: list[str] | None = None, update: str | None = None,
                      log=print) -> Path:
    """Write the leaderboard (and its per-document scores); with ``repeats`` (folders of re-runs
    of some of its runs) each metric's tolerance is measured from them; with ``update`` (an
    existing leaderboard) its entries that no run replaces are kept as they are."""
    if not tolerance >= 0:
        raise E2UError(f"--tolerance {tolerance} is not accepted; give an absolute tolerance >= 0")
    runs = load_runs(folders, with_samples=True, log=log)
    kept, kept_docs = _kept_entries(update, {_identity_key(identity_of(r)) for r in runs}, log) if update else ([], {})
    measured = measured_tolerances(runs, load_runs(repeats, with_samples=False, log=log)) if repeats else {}
    if repeats and not measured:
        raise E2UError(f"--repeats {' '.join(repeats)} holds no results to measure tolerances from")
    board = {"format": FORMAT, "name": name or f"e2u leaderboard from {', '.join(folders)}",
             "note": note}
    if measured:
        board["tolerances"] = {
            "rule": f"{TOLERANCE_FACTOR} x the largest difference between a run and its repeats "
                    f"(another batch size or process, same machine); {tolerance:g} for metrics no "
                    "repeat measured",
            "metrics": measured}
    elif update:
        # Tolerances measure this machine's run-to-run noise, not the runs: new runs of an updated
        # board take the ones measured before, unless --repeats measures them again.
        previous = load_leaderboard(update).get("tolerances")
        if previous:
            board["tolerances"], measured = previous, previous["metrics"]
    board["entries"] = sorted(build_entries(runs, tolerance, measured) + kept, key=_entry_order)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = {entry_id(_identity_key(identity_of(r))): per_document(r) for r in runs}
    tables = {**kept_docs, **{key: table for key, table in tables.items() if table}}
    if tables:  # statistical mode of regress reads them (runs written with --log_samples)
        write_docs(docs_path(path), tables)
    text = (json.dumps(board, indent=1) if path.suffix == ".json"
            else yaml.safe_dump(board, sort_keys=False, width=100, allow_unicode=True))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    count = sum(len(m) for e in board["entries"] for m in e["metrics"].values())
    log(f"e2u: leaderboard with {len(board['entries'])} entries ({count} numbers) written to {path}"
        + (f", per-document scores of {len(tables)} to {docs_path(path)}" if tables else "")
        + (f"; tolerances of {len(measured)} metrics measured from repeats" if measured else ""))
    return path


# ------------------------------------------------------------------ reading

def _bad(path: Path, problem: str) -> E2UError:
    return E2UError(f"leaderboard file {path}: {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_fingerprint(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in value.items())


def load_leaderboard(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    try:
        board = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise _bad(path, f"is not valid {kind} ({str(exc).splitlines()[0]})") from None
    if not isinstance(board, dict):
        raise _bad(path, "must be a mapping with 'format' and 'entries'")
    if board.get("format") != FORMAT:
        raise _bad(path, f"format is {board.get('format')!r}; expected {FORMAT!r}")
    entries = board.get("entries")
    if not isinstance(entries, list) or not entries:
        raise _bad(path, "'entries' must be a non-empty list")
    for number, entry in enumerate(entries, 1):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            raise _bad(path, f"{where} is not a mapping")
        missing = [k for k in ("model", "method", "metrics") if k not in entry]
        if missing:
            raise _bad(path, f"{where} lacks {', '.join(missing)}")
        where = f"entry {number} ({entry['method']})"
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise _bad(path, f"{where} has unknown key(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(ENTRY_KEYS))}")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise _bad(path, f"{where}: options must be a mapping")
        entry["options"] = {str(k): str(v) for k, v in options.items()}
        entry["limit"] = _normal_limit(entry.get("limit"))
        fingerprint = (entry.get("run_card") or {}).get("fingerprint")
        if fingerprint is not None and not _is_fingerprint(fingerprint):
            raise _bad(path, f"{where}: run_card.fingerprint must be a mapping of field -> text, "
                             f"number or boolean (got {fingerprint!r})")
        metrics = entry["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            raise _bad(path, f"{where}: metrics must be a non-empty mapping task -> metric -> "
                             "{value, tolerance}")
        for task, values in metrics.items():
            if not isinstance(values, dict) or not values:
                raise _bad(path, f"{where}: metrics of {task!r} must be a mapping metric -> {{value, tolerance}}")
            for metric, spec in values.items():
                name = f"{task}/{metric}"
                if not isinstance(spec, dict) or not _is_number(spec.get("value")):
                    raise _bad(path, f"{where}: {name} needs a numeric 'value' (got {spec!r})")
                tolerance = spec.get("tolerance")
                if not _is_number(tolerance) or tolerance < 0:
                    raise _bad(path, f"{where}: {name} needs a 'tolerance' >= 0 (got {tolerance!r})")
    return board


def runs_of_leaderboard(path: str | Path) -> list[Run]:
    """A leaderboard's entries as runs, for ``e2u report``: the numbers and, from its
    ``.docs.json``, the per-document scores (no questions or answers: no case study). A board
    holds runs that outlive their results folders (across machines and sessions)."""
    board = load_leaderboard(path)
    docs = load_docs(path) if docs_path(path).is_file() else {}
    runs = []
    for number, entry in enumerate(board["entries"], 1):
        tables = docs.get(entry_id(_identity_key(entry)), {})
        samples = {task: [{"doc_id": i, "index": row, **{m: float(v[i]) for m, v in table.items() if m != "docs"}}
                          for i, row in enumerate(table["docs"])]
                   for task, table in tables.items()}
        runs.append(Run(
            path=Path(f"{path}#{number}"), model=str(entry["model"]), method=str(entry["method"]),
            options=entry["options"], dataset=entry.get("dataset"), forget_size=entry.get("forget_size"),
            forget_seed=entry.get("forget_seed"), seed=entry.get("seed"), limit=entry.get("limit"),
            metrics={task: {m: float(spec["value"]) for m, spec in values.items()}
                     for task, values in entry["metrics"].items()},
            card=dict(entry.get("run_card") or {}), samples=samples))
    return runs


# ------------------------------------------------------------------ checking

def _card_notes(entry: dict, run: Run) -> list[str]:
    want, got = entry.get("run_card") or {}, run.card
    notes = []
    for key in CARD_KEYS:
        if key not in want or key not in got or want[key] == got[key]:
            continue
        if isinstance(want[key], dict) and isinstance(got[key], dict):
            moved = [f"{k} {want[key].get(k)} -> {got[key].get(k)}"
                     for k in sorted(set(want[key]) | set(got[key])) if want[key].get(k) != got[key].get(k)]
            notes.append(f"{key}: {', '.join(moved)}")
        else:
            notes.append(f"{key}: {str(want[key])[:12]} -> {str(got[key])[:12]}")
    return notes


def _fmt(value: float) -> str:
    return f"{value:.6g}"


MODES = ("auto", "exact", "statistical")


@dataclass
class Checked:
    """What regress found: failing rows (exact and statistical), notes, how many numbers were
    checked in each mode, runs without a result."""

    rows: list[tuple] = field(default_factory=list)
    comparisons: list[tuple[str, Comparison]] = field(default_factory=list)
    paired: list[tuple[str, Comparison]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"exact": 0, "statistical": 0})
    runs: dict[str, int] = field(default_factory=lambda: {"exact": 0, "statistical": 0})
    missing: list[str] = field(default_factory=list)


def _mode_for(mode: str, entry: dict, run: Run) -> tuple[str, str]:
    """(mode, why): ``auto`` is exact when the fingerprints match, statistical otherwise."""
    if mode != "auto":
        return mode, "asked"
    differ = fingerprint_differences((entry.get("run_card") or {}).get("fingerprint"), run.card.get("fingerprint"))
    if differ is None:  # a leaderboard written before fingerprints: its own tolerances
        return "exact", "no fingerprint to compare"
    if differ:
        return "statistical", f"fingerprint differs in {', '.join(differ)}"
    return "exact", "fingerprints match"


def _check_exact(entry: dict, candidates: list[Run], tolerance: float | None, found: Checked) -> None:
    for task, values in entry["metrics"].items():
        for metric, spec in values.items():
            found.counts["exact"] += 1
            allowed = spec["tolerance"] if tolerance is None else tolerance
            got = next((r.metrics[task][metric] for r in reversed(candidates)
                        if metric in r.metrics.get(task, {})), None)
            if got is None:
                found.rows.append((_describe(entry), f"{task}/{metric}", _fmt(spec["value"]), "absent",
                                   _fmt(allowed), ""))
            elif not abs(got - spec["value"]) <= allowed + 1e-12:
                found.rows.append((_describe(entry), f"{task}/{metric}", _fmt(spec["value"]), _fmt(got),
                                   _fmt(allowed), f"{got - spec['value']:+.6g}"))


def _check_statistical(entry: dict, run: Run, docs: dict, margin: float | None, found: Checked) -> None:
    what = _describe(entry)
    want = docs.get(entry_id(_identity_key(entry)))
    if not want:
        raise E2UError(f"{what}: the leaderboard's per-document scores have no entry for this run; "
                       "regenerate the leaderboard from results run with --log_samples, or use --mode exact")
    for comparison in compare(want, run, what, margin):
        found.counts["statistical"] += 1
        found.paired.append((what, comparison))
        if comparison.worse:
            found.comparisons.append((what, comparison))
    unpaired = unpaired_metrics(entry["metrics"], want)
    if unpaired:
        shown = ", ".join(unpaired[:8]) + (f" and {len(unpaired) - 8} more" if len(unpaired) > 8 else "")
        found.notes.append(f"{what}: not checked in statistical mode (no per-document scores): {shown}")


def regress(leaderboard: str, folders: list[str], tolerance: float | None = None,
            allow_missing: bool = False, mode: str = "auto", margin: float | None = None,
            log=print) -> int:
    """Check results against a leaderboard; returns the exit status (0 ok, 1 a number moved or a
    run is missing). ``mode``: exact (each number within its tolerance), statistical (paired
    per-document comparison, see :mod:`e2u_experiments.statistical`) or auto (exact where the
    environment fingerprints match)."""
    if tolerance is not None and not tolerance >= 0:
        raise E2UError(f"--tolerance {tolerance} is not accepted; give an absolute tolerance >= 0")
    if mode not in MODES:
        raise E2UError(f"--mode {mode!r} is not accepted; use one of {', '.join(MODES)}")
    if margin is not None and not margin >= 0:
        raise E2UError(f"--margin {margin} is not accepted; give a difference >= 0")
    board = load_leaderboard(leaderboard)
    runs = load_runs(folders, with_samples=mode != "exact", log=log)
    by_identity: dict[str, list[Run]] = {}
    for run in runs:
        by_identity.setdefault(_identity_key(identity_of(run)), []).append(run)
    found, docs = Checked(), None
    for entry in board["entries"]:
        candidates = by_identity.get(_identity_key(entry), [])
        if not candidates:
            found.missing.append(_describe(entry))
            continue
        found.notes += [f"{_describe(entry)}: run card differs: {note}"
                        for note in _card_notes(entry, candidates[-1])]
        chosen, why = _mode_for(mode, entry, candidates[-1])
        found.runs[chosen] += 1
        found.notes.append(f"{_describe(entry)}: {chosen} mode ({why})")
        if chosen == "exact":
            _check_exact(entry, candidates, tolerance, found)
        else:
            docs = load_docs(leaderboard) if docs is None else docs
            _check_statistical(entry, candidates[-1], docs, margin, found)
    return _report(found, leaderboard, folders, allow_missing, log)


def _report(found: Checked, leaderboard: str, folders: list[str], allow_missing: bool, log) -> int:
    for note in found.notes:
        log(f"note: {note}")
    for item in found.missing:
        log(f"{'missing' if not allow_missing else 'not run'}: no result for {item}")
    if found.rows:
        log(f"e2u regress: {len(found.rows)} of {found.counts['exact']} numbers outside tolerance "
            f"(leaderboard {leaderboard}):")
        _table(("run", "metric", "expected", "got", "tolerance", "diff"), found.rows, log)
    if found.paired:
        log(f"e2u regress: statistical mode, each metric paired over the same documents "
            f"(difference = got - expected, paired-bootstrap {LEVEL:.0%} interval):")
        _table(("run", "metric", "expected", "got", f"diff [{LEVEL:.0%} interval]", "margin", "decision"),
               [(what, f"{c.task}/{c.metric}", _fmt(c.expected), _fmt(c.got),
                 f"{c.diff:+.4f} [{c.low:+.4f}, {c.high:+.4f}]", _fmt(c.margin),
                 "worse" if c.worse else "ok")
                for what, c in found.paired], log)
    if found.comparisons:
        log(f"e2u regress: {len(found.comparisons)} of {found.counts['statistical']} metrics worse "
            f"beyond their margin, paired over the same documents (leaderboard {leaderboard}): "
            + "; ".join(f"{what} {c.task}/{c.metric} {c.diff:+.4f} [{c.low:+.4f}, {c.high:+.4f}], margin "
                        f"{_fmt(c.margin)}" for what, c in found.comparisons))
    failed = bool(found.rows or found.comparisons) or (bool(found.missing) and not allow_missing)
    if not failed:
        parts = []
        if found.runs["exact"]:
            parts.append(f"all {found.counts['exact']} numbers of {found.runs['exact']} run(s) within tolerance")
        if found.runs["statistical"]:
            parts.append(f"{found.runs['statistical']} run(s) in statistical mode: none of "
                         f"{found.counts['statistical']} metrics worse beyond its margin")
        log(f"e2u regress: {'; '.join(parts) or 'nothing to check'} (leaderboard {leaderboard})")
    elif not found.rows and not found.comparisons:
        log(f"e2u regress: {len(found.missing)} leaderboard run(s) have no result in {', '.join(folders)}")
    return EXIT_MOVED if failed else 0


def _table(header: tuple, rows: list[tuple], log) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        log("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
