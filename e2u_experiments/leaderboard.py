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
from pathlib import Path
from typing import Any

import yaml

from e2u_experiments.runs import Run, load_runs
from e2u_experiments.report import method_order
from e2u_tasks.errors import E2UError

FORMAT = "e2u-leaderboard/1"
IDENTITY = ("model", "method", "options", "dataset", "forget_size", "forget_seed", "seed", "limit")
ENTRY_KEYS = set(IDENTITY) | {"metrics", "run_card"}
CARD_KEYS = ("packages", "hparams_sha256", "model_sha256", "model_file_sha256", "data_sha256",
             "fingerprint")
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

def build_entries(runs: list[Run], tolerance: float) -> list[dict]:
    entries = []
    for run in sorted(runs, key=lambda r: (r.model, str(r.dataset), r.forget_size or 0,
                                           method_order(r.label), str(r.seed))):
        metrics = {}
        for task, values in sorted(run.metrics.items()):
            kept = {m: {"value": v, "tolerance": tolerance} for m, v in sorted(values.items())
                    if not m.endswith("_stderr") and not math.isnan(v)}
            if kept:
                metrics[task] = kept
        card = {k: run.card[k] for k in CARD_KEYS if k in run.card}
        entries.append({**identity_of(run), "run_card": card, "metrics": metrics})
    return entries


def write_leaderboard(folders: list[str], out: str, name: str = "", tolerance: float = 1e-6,
                      note: str = "", log=print) -> Path:
    if not tolerance >= 0:
        raise E2UError(f"--tolerance {tolerance} is not accepted; give an absolute tolerance >= 0")
    runs = load_runs(folders, with_samples=False, log=log)
    board = {"format": FORMAT, "name": name or f"e2u leaderboard from {', '.join(folders)}",
             "note": note, "entries": build_entries(runs, tolerance)}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (json.dumps(board, indent=1) if path.suffix == ".json"
            else yaml.safe_dump(board, sort_keys=False, width=100, allow_unicode=True))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    count = sum(len(m) for e in board["entries"] for m in e["metrics"].values())
    log(f"e2u: leaderboard with {len(board['entries'])} entries ({count} numbers) written to {path}")
    return path


# ------------------------------------------------------------------ reading

def _bad(path: Path, problem: str) -> E2UError:
    return E2UError(f"leaderboard file {path}: {problem}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def regress(leaderboard: str, folders: list[str], tolerance: float | None = None,
            allow_missing: bool = False, log=print) -> int:
    """Check results against a leaderboard; returns the exit status (0 ok, 1 a number moved or a
    run is missing)."""
    if tolerance is not None and not tolerance >= 0:
        raise E2UError(f"--tolerance {tolerance} is not accepted; give an absolute tolerance >= 0")
    board = load_leaderboard(leaderboard)
    runs = load_runs(folders, with_samples=False, log=log)
    by_identity: dict[str, list[Run]] = {}
    for run in runs:
        by_identity.setdefault(_identity_key(identity_of(run)), []).append(run)
    rows, missing, notes, checked = [], [], [], 0
    for entry in board["entries"]:
        candidates = by_identity.get(_identity_key(entry), [])
        if not candidates:
            missing.append(_describe(entry))
            continue
        for note in _card_notes(entry, candidates[-1]):
            notes.append(f"{_describe(entry)}: run card differs: {note}")
        for task, values in entry["metrics"].items():
            for metric, spec in values.items():
                checked += 1
                allowed = spec["tolerance"] if tolerance is None else tolerance
                got = next((r.metrics[task][metric] for r in reversed(candidates)
                            if metric in r.metrics.get(task, {})), None)
                if got is None:
                    rows.append((_describe(entry), f"{task}/{metric}", _fmt(spec["value"]), "absent",
                                 _fmt(allowed), ""))
                elif not abs(got - spec["value"]) <= allowed + 1e-12:
                    rows.append((_describe(entry), f"{task}/{metric}", _fmt(spec["value"]), _fmt(got),
                                 _fmt(allowed), f"{got - spec['value']:+.6g}"))
    for note in notes:
        log(f"note: {note}")
    failed = bool(rows) or (bool(missing) and not allow_missing)
    for item in missing:
        log(f"{'missing' if not allow_missing else 'not run'}: no result for {item}")
    if rows:
        log(f"e2u regress: {len(rows)} of {checked} numbers outside tolerance "
            f"(leaderboard {leaderboard}):")
        header = ("run", "metric", "expected", "got", "tolerance", "diff")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            log("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if not failed:
        log(f"e2u regress: all {checked} numbers of {len(board['entries']) - len(missing)} "
            f"run(s) within tolerance (leaderboard {leaderboard})")
    elif not rows:
        log(f"e2u regress: {len(missing)} leaderboard run(s) have no result in {', '.join(folders)}")
    return EXIT_MOVED if failed else 0
