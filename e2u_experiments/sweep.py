"""``e2u sweep <config.yaml>``: a grid of ``lm_eval --model e2u`` runs, one results folder each.

Config (YAML)::

    output_dir: results/smollm2-table1   # relative to the current folder (or --output-dir)
    tasks: tofu_factual                  # optional: default from each run's dataset
    log_samples: true                    # per-document samples (bootstrap CIs, case study)
    limit: null                          # lm-eval --limit
    lm_eval_args: [--device, cpu]        # any other lm_eval flags
    common: {model: smollm2-135m-instruct, dataset: tofu_factual, forget_size: 40, seed: 0}
    grid:                                # union of blocks; each block is a product of its lists
      - method: [none, rome, memit, alphaedit]
      - method: [rome, memit]
        merge: [5]

``model`` becomes ``pretrained``; every other key (method, dataset, forget_size, seed, merge,
target, any hparam) is an ``--model_args`` key. Each run writes into
``<output_dir>/<run id>/`` through a temporary folder renamed on success, so a folder that exists
is a finished run: re-running the sweep skips it (resumable), and an interrupted or failed run
leaves nothing behind but its log (``<output_dir>/logs/<run id>.log``). Runs are independent:
``--shard i/n`` runs every n-th, so a scheduler can run a sweep as n jobs.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2u_models.cache import atomic_directory, json_sha256
from e2u_tasks.errors import E2UError

CONFIG_KEYS = {"name", "description", "output_dir", "tasks", "log_samples", "limit",
               "lm_eval_args", "common", "grid"}
DEFAULT_TASKS = {"tofu_factual": "tofu_factual", "pistol": "pistol", "known_facts": "known_facts"}
DEFAULT_MODEL = "smollm2-135m-instruct"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunSpec:
    """One lm-eval run of the grid: its model args (``pretrained`` included) and tasks."""

    model_args: dict[str, Any]
    tasks: str

    @property
    def run_id(self) -> str:
        """Readable, unique and stable folder name: model, dataset, method, options, seed."""
        args = dict(self.model_args)
        head = [Path(str(args.pop("pretrained"))).name, Path(str(args.pop("dataset", "tofu_factual"))).stem,
                str(args.pop("method", "none"))]
        seed = args.pop("seed", None)
        parts = head + [f"{k}-{_slug_value(v)}" for k, v in sorted(args.items())]
        if seed is not None:
            parts.append(f"seed-{_slug_value(seed)}")
        slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "__".join(parts))
        if len(slug) > 150:
            slug = slug[:120] + "__" + json_sha256(self.model_args)[:12]
        return slug

    def label(self) -> str:
        args = {k: v for k, v in self.model_args.items() if k != "pretrained"}
        return " ".join(f"{k}={_compact(v)}" for k, v in args.items())


def _slug_value(value: Any) -> str:
    return "+".join(map(_slug_value, value)) if isinstance(value, list) else Path(str(value)).name


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


@dataclass
class SweepConfig:
    path: Path
    output_dir: Path
    runs: list[RunSpec]
    log_samples: bool = True
    limit: float | None = None
    lm_eval_args: list[str] = field(default_factory=list)
    name: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike, output_dir: str | None = None) -> "SweepConfig":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise E2UError(f"sweep config {path}: cannot be read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise E2UError(f"sweep config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise E2UError(f"sweep config {path}: must be a mapping with keys {sorted(CONFIG_KEYS)}")
        unknown = sorted(set(raw) - CONFIG_KEYS)
        if unknown:
            raise E2UError(f"sweep config {path}: unknown key(s) {', '.join(unknown)}; "
                           f"accepted: {', '.join(sorted(CONFIG_KEYS))}")
        common = raw.get("common") or {}
        if not isinstance(common, dict):
            raise E2UError(f"sweep config {path}: 'common' must be a mapping of model args")
        blocks = raw.get("grid") or [{}]
        blocks = [blocks] if isinstance(blocks, dict) else blocks
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise E2UError(f"sweep config {path}: 'grid' must be a list of mappings "
                           "(key: [values]); each block is the product of its lists")
        extra = raw.get("lm_eval_args") or []
        if not isinstance(extra, list) or not all(isinstance(a, (str, int, float)) for a in extra):
            raise E2UError(f"sweep config {path}: 'lm_eval_args' must be a list of strings")
        managed = {"--model", "--model_args", "--tasks", "--output_path", "--log_samples", "--limit"}
        clash = sorted(a for a in map(str, extra) if a.split("=")[0] in managed)
        if clash:
            raise E2UError(f"sweep config {path}: lm_eval_args must not set {', '.join(clash)} "
                           "(the sweep sets them; use model args, tasks, log_samples, limit)")
        limit = raw.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))):
            raise E2UError(f"sweep config {path}: limit={limit!r} is not a number")
        runs: list[RunSpec] = []
        seen = set()
        for number, block in enumerate(blocks, 1):
            for key, values in block.items():
                if not isinstance(values, list) or not values:
                    raise E2UError(f"sweep config {path}: grid block {number}, key {key!r}: give a "
                                   f"non-empty list of values (got {values!r}); a list-valued "
                                   "option is written [[3, 4]]")
            keys = list(block)
            for combo in itertools.product(*(block[k] for k in keys)):
                settings = {**common, **dict(zip(keys, combo))}
                spec = _run_spec(path, settings, raw.get("tasks"))
                key = json_sha256([spec.model_args, spec.tasks])
                if key not in seen:
                    seen.add(key)
                    runs.append(spec)
        out = output_dir or raw.get("output_dir")
        if not out:
            raise E2UError(f"sweep config {path}: no output_dir (set it in the file or pass --output-dir)")
        return cls(path=path, output_dir=Path(out), runs=runs, log_samples=bool(raw.get("log_samples", True)),
                   limit=limit, lm_eval_args=[str(a) for a in extra], name=str(raw.get("name") or path.stem))

    def command(self, run: RunSpec, output_path: Path) -> list[str]:
        """The lm-eval command of one run: ``e2u-lm-eval`` (lm-eval's CLI with e2u registered
        whatever the start-up hook does; same defaults as ``lm_eval``, e2u's batch size included)."""
        cmd = [*_lm_eval_executable(), "--model", "e2u",
               "--model_args", json.dumps(run.model_args), "--tasks", run.tasks,
               "--output_path", str(output_path)]
        if self.log_samples:
            cmd.append("--log_samples")
        if self.limit is not None:
            cmd += ["--limit", str(self.limit)]
        return cmd + self.lm_eval_args


def _lm_eval_executable() -> list[str]:
    script = shutil.which("e2u-lm-eval", path=str(Path(sys.executable).parent)) or shutil.which("e2u-lm-eval")
    return [script] if script else [sys.executable, "-m", "e2u_models.cli"]


def _run_spec(path: Path, settings: dict[str, Any], tasks: Any) -> RunSpec:
    settings = dict(settings)
    if "pretrained" in settings:
        raise E2UError(f"sweep config {path}: write the model as 'model', not 'pretrained'")
    model = settings.pop("model", DEFAULT_MODEL)
    run_tasks = settings.pop("tasks", tasks)
    for key, value in settings.items():
        if isinstance(value, dict) or value is None:
            raise E2UError(f"sweep config {path}: model arg {key}={value!r} must be a value or a list")
    dataset = str(settings.get("dataset", "tofu_factual"))
    if run_tasks is None:
        run_tasks = DEFAULT_TASKS.get(dataset, "e2u_custom")
    if isinstance(run_tasks, list):
        run_tasks = ",".join(map(str, run_tasks))
    if not isinstance(run_tasks, str) or not run_tasks.strip():
        raise E2UError(f"sweep config {path}: tasks={run_tasks!r} must be a task name or a list")
    return RunSpec(model_args={"pretrained": str(model), **settings}, tasks=run_tasks)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise E2UError(f"--shard {text!r} is not accepted; give i/n with 0 <= i < n (e.g. 0/4)")
    return int(match[1]), int(match[2])


def finished(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.rglob("results_*.json"))


def _summary(run_dir: Path) -> str:
    """The run's headline numbers for the progress line (group composite when there is one)."""
    try:
        path = max(run_dir.rglob("results_*.json"))
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return ""
    values = [f"{group} composite {row['composite,none']:.3f}"
              for group, row in (results.get("groups") or {}).items() if "composite,none" in row]
    return ", ".join(values)


def run_sweep(config: SweepConfig, shard: tuple[int, int] = (0, 1), dry_run: bool = False,
              launcher: str = "", log=print) -> int:
    """Run (or list) the sweep's runs of this shard; returns the number of failed runs.

    ``launcher`` prefixes every lm-eval command (``srun -n1 --gres=gpu:1``, ``flock <lockfile>``).
    """
    prefix = shlex.split(launcher) if launcher else []
    # A terminated sweep stops its lm-eval run and removes the run's temporary folder.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run_all(config, shard, dry_run, prefix, log)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_all(config: SweepConfig, shard: tuple[int, int], dry_run: bool, prefix: list[str], log) -> int:
    index, count = shard
    mine = [(i, run) for i, run in enumerate(config.runs) if i % count == index]
    total = len(config.runs)
    failed = []
    started_all = time.perf_counter()
    for i, run in mine:
        final = config.output_dir / run.run_id
        head = f"[{i + 1}/{total}] {run.run_id}"
        if finished(final):
            log(f"{head}: finished earlier, skipped")
            continue
        if dry_run:
            log(f"{head}: " + " ".join(_quote(a) for a in prefix + config.command(run, final)))
            continue
        config.output_dir.mkdir(parents=True, exist_ok=True)
        log_file = config.output_dir / "logs" / f"{run.run_id}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log(f"{head}: running ({run.label()}; log {log_file})")
        started = time.perf_counter()
        try:
            with atomic_directory(final) as tmp:
                cmd = prefix + config.command(run, tmp)
                with open(log_file, "w", encoding="utf-8") as handle:
                    handle.write("$ " + " ".join(_quote(a) for a in cmd) + "\n")
                    handle.flush()
                    code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT)
                if code != 0 or not finished(tmp):
                    raise RuntimeError(f"exit status {code}")
                record = {"run_id": run.run_id, "model_args": run.model_args, "tasks": run.tasks,
                          "command": cmd, "sweep": str(config.path), "seconds":
                          round(time.perf_counter() - started, 1), "finished": time.strftime(
                              "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (tmp / RUN_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        except RuntimeError as exc:
            failed.append(run.run_id)
            tail = _tail(log_file)
            log(f"{head}: FAILED ({exc}) after {time.perf_counter() - started:.0f} s; "
                f"last log line: {tail}")
            continue
        log(f"{head}: done in {time.perf_counter() - started:.0f} s; {_summary(final)}")
    if not dry_run:
        log(f"sweep {config.name}: {len(mine) - len(failed)}/{len(mine)} runs present in "
            f"{config.output_dir} ({time.perf_counter() - started_all:.0f} s)"
            + (f"; failed: {', '.join(failed)}" if failed else ""))
    return len(failed)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def _tail(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else "(empty log)"


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_./=:,+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"
