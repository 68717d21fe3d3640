"""lm-eval results files read into runs: what was run (model, method, options, split, seed) and
what came out (per-task metrics, per-document samples, the run card).

Works on any ``results_*.json`` lm-eval writes with ``--model e2u`` (``config.e2u`` holds the
method, split and provenance) and, less precisely, on other models' results. A file that cannot be
read is one error line naming the file and the problem.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2u_tasks.errors import E2UError
from e2u_tasks.splits import TASK_SPLITS

# Model args that say *which* run it is (kept as separate fields) or do not change the numbers.
IDENTITY_ARGS = frozenset({
    "pretrained", "method", "seed", "dataset", "forget_size", "forget_seed", "forget_edge",
    "forget_indices", "data_dir", "device", "batch_size", "max_batch_size", "cache", "cache_dir",
})
METRICS = ("rouge1_recall", "prob", "mrr", "hit_rate")
# Refusal quality of the generated answers (e2u_tasks.refusal); in results since issue #6.
REFUSAL_METRICS = ("refusal_rate", "entity_mention", "answer_leak")
# Logit-lens metrics (lens_mrr, lens_hit@<k>; e2u_tasks.metrics); in results since issue #24.
LENS_PREFIX = "lens_"
TIMESTAMP = re.compile(r"results_(.+)\.json$")
# The headline metric of another benchmark (mmlu, hellaswag, e2u_general_mc): the first of these
# it reports, else its first metric.
HEADLINE_METRICS = ("acc_norm", "acc")


def split_of(task: str) -> str | None:
    """The e2u split a task evaluates, read from its name (``tofu_forget`` -> forget,
    ``pistol_retain_far`` -> retain_far), or None for a task of another kind."""
    matches = [split for split in TASK_SPLITS if task.endswith(f"_{split}")]
    return max(matches, key=len) if matches else None


def stderr_name(metric: str) -> str:
    """``acc`` -> ``acc_stderr``; ``exact_match,strict-match`` -> ``exact_match_stderr,strict-match``."""
    name, comma, filt = metric.partition(",")
    return f"{name}_stderr{comma}{filt}"


@dataclass
class Run:
    """One results file."""

    path: Path
    model: str
    method: str
    options: dict[str, str]
    dataset: str | None
    forget_size: int | None
    forget_seed: int | None
    seed: int | None
    limit: Any
    metrics: dict[str, dict[str, float]]          # task or group -> metric (",none" dropped) -> value
    card: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # task -> per-document rows
    timestamp: str = ""
    group_subtasks: dict[str, list[str]] = field(default_factory=dict)  # lm-eval's group -> children

    @property
    def label(self) -> str:
        """Method and its options, as in the tables: ``rome (merge=5)``."""
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method} ({opts})" if opts else self.method

    def identity(self) -> dict[str, Any]:
        """Everything that makes two runs comparable (leaderboard key without task/metric)."""
        return {"model": self.model, "method": self.method, "options": dict(sorted(self.options.items())),
                "dataset": self.dataset, "forget_size": self.forget_size,
                "forget_seed": self.forget_seed, "seed": self.seed, "limit": self.limit}

    def task_for(self, split: str) -> str | None:
        """The task of a split in this run (``tofu_forget``, ``pistol_forget``, ``e2u_forget``)."""
        matches = sorted(t for t in self.metrics if t.endswith(f"_{split}"))
        return matches[0] if matches else None

    def group(self) -> str | None:
        """The e2u group of the forget task (``tofu_factual``, ``pistol``): it reports the composite."""
        forget = self.task_for("forget")
        if forget is None:
            return None
        prefix = forget[: -len("_forget")]
        for name in self.metrics:
            if (name.startswith(prefix) and split_of(name) is None
                    and "composite" in self.metrics[name]):
                return name
        return None

    def _is_e2u(self, name: str) -> bool:
        values = self.metrics.get(name, {})
        if "composite" in values or (split_of(name) is not None and "rouge1_recall" in values):
            return True
        return any(self._is_e2u(child) for child in self.group_subtasks.get(name, []))

    def headline(self, task: str) -> str | None:
        """The metric a benchmark is summed up by: acc_norm, else acc, else its first metric."""
        values = self.metrics.get(task, {})
        for metric in HEADLINE_METRICS:
            if metric in values:
                return metric
        return next((m for m in values if not m.partition(",")[0].endswith("_stderr")), None)

    def utility_tasks(self) -> list[str]:
        """The other benchmarks in these results (``mmlu``, ``hellaswag``, ``e2u_general_mc``):
        every top-level task or group that is no part of e2u's forget/retain evaluation; a group
        without a metric of its own stands for its children."""
        children = {child for kids in self.group_subtasks.values() for child in kids}
        found: list[str] = []

        def visit(name: str) -> None:
            if self._is_e2u(name):
                return
            if self.headline(name) is not None:
                found.append(name)
                return
            for child in self.group_subtasks.get(name, []):
                visit(child)

        for name in (set(self.metrics) | set(self.group_subtasks)) - children:
            visit(name)
        return sorted(found)

    def value(self, task: str | None, metric: str) -> float | None:
        if task is None:
            return None
        return self.metrics.get(task, {}).get(metric)

    def split_value(self, split: str, metric: str) -> float | None:
        return self.value(self.task_for(split), metric)

    def composite(self) -> float | None:
        """1 - R1@forget + R1@retain (the group row when there is one, else from the tasks)."""
        group = self.group()
        if group is not None and "composite" in self.metrics.get(group, {}):
            return self.metrics[group]["composite"]
        forget, retain = self.split_value("forget", "rouge1_recall"), self.split_value("retain", "rouge1_recall")
        return None if forget is None or retain is None else 1.0 - forget + retain


def _fail(path: Path, problem: str) -> E2UError:
    return E2UError(f"results file {path}: {problem}")


def _parse_model_args(path: Path, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        args = {}
        for item in filter(None, value.split(",")):
            key, _, raw = item.partition("=")
            args[key.strip()] = raw.strip()
        return args
    raise _fail(path, f"config.model_args is a {type(value).__name__}, expected a mapping")


def _number(value: Any) -> float:
    """A metric value as float; NaN for what lm-eval writes when it has none ("N/A")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # lm-eval writes "N/A" for stderr it could not compute
        except (TypeError, ValueError):
            return math.nan
    return float(value)


def _metrics(path: Path, data: dict) -> dict[str, dict[str, float]]:
    results = data.get("results")
    if not isinstance(results, dict) or not results:
        raise _fail(path, "no 'results' mapping of tasks (is it an lm-eval results_*.json?)")
    table: dict[str, dict[str, float]] = {}
    for section in (results, data.get("groups") or {}):
        if not isinstance(section, dict):
            raise _fail(path, "'groups' is not a mapping")
        for task, row in section.items():
            if not isinstance(row, dict):
                raise _fail(path, f"results of task {task!r} are not a mapping")
            values = table.setdefault(task, {})
            for key, value in row.items():
                if "," not in key:
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt == "none" else key
                number = _number(value)
                if math.isnan(number) and not metric.endswith("_stderr"):
                    raise _fail(path, f"{task} {key} = {value!r} is not a number")
                values[name] = number
    return table


def _group_subtasks(path: Path, data: dict) -> dict[str, list[str]]:
    value = data.get("group_subtasks") or {}
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        raise _fail(path, "'group_subtasks' is not a mapping of group -> list of tasks")
    return {str(k): [str(c) for c in v] for k, v in value.items()}


def _options(model_args: dict[str, Any], hparams: dict[str, Any]) -> dict[str, str]:
    """Method options as given, with hparams at their effective (type-checked) value."""
    options = {}
    for key, value in model_args.items():
        if key in IDENTITY_ARGS:
            continue
        effective = hparams.get(key, value)
        options[key] = json.dumps(effective) if isinstance(effective, (list, dict)) else str(effective)
    return options


def _limit(value: Any) -> Any:
    """lm-eval records ``--limit 4`` as 4.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_run(path: str | Path, with_samples: bool = True) -> Run:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, "is not a JSON object")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise _fail(path, "'config' is not a mapping")
    model_args = _parse_model_args(path, config.get("model_args"))
    e2u = config.get("e2u") or {}
    split = e2u.get("split") or {}
    hparams = e2u.get("hparams") or {}
    model = ((e2u.get("model_source") or {}).get("pretrained") or model_args.get("pretrained")
             or data.get("model_name") or "unknown")
    method = str(e2u.get("method") or model_args.get("method") or config.get("model") or "unknown")
    match = TIMESTAMP.search(path.name)
    run = Run(
        path=path, model=str(model), method=method, options=_options(model_args, hparams),
        dataset=split.get("dataset") or model_args.get("dataset"),
        forget_size=_int_or_none(split.get("forget_rows", model_args.get("forget_size"))),
        forget_seed=_int_or_none(split.get("forget_seed", model_args.get("forget_seed"))),
        seed=_int_or_none(e2u.get("seed", model_args.get("seed"))),
        limit=_limit(config.get("limit")), metrics=_metrics(path, data), card=run_card(data),
        timestamp=match[1] if match else "", group_subtasks=_group_subtasks(path, data))
    if with_samples and match:
        run.samples = _samples(path, match[1], run.metrics)
    return run


def run_card(data: dict) -> dict[str, Any]:
    """The provenance a leaderboard keeps: package versions, seeds, hashes, costs."""
    config = data.get("config") or {}
    e2u = config.get("e2u") or {}
    split = e2u.get("split") or {}
    report = e2u.get("method_report") or {}
    source = e2u.get("model_source") or {}
    card = {
        "packages": e2u.get("packages") or {"lm_eval": data.get("lm_eval_version"),
                                            "transformers": data.get("transformers_version")},
        "seed": e2u.get("seed"),
        "lm_eval_seeds": {k: config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")
                          if k in config},
        "hparams_sha256": e2u.get("hparams_sha256"),
        "model_sha256": e2u.get("model_sha256"),  # content hash of the weights before the method
        "model_file_sha256": source.get("gguf_sha256") or config.get("model_sha"),  # file / hub revision
        "data_sha256": split.get("data_sha256"),
        "forget_row_indices": split.get("forget_row_indices"),
        # attack=relearn on half the forget rows: the rows the forget task evaluated
        "evaluated_forget_row_indices": split.get("evaluated_forget_row_indices"),
        "attack": {k: v for k, v in (e2u.get("attack") or {}).items() if k.startswith("attack")},
        "edit_seconds": report.get("seconds"),
        "run_card": e2u.get("run_card"),
        "fingerprint": e2u.get("fingerprint"),
        "targets": (e2u.get("run_card") or {}).get("targets"),  # editors' own verification
    }
    return {k: v for k, v in card.items() if v not in (None, {}, [])}


def _samples(path: Path, stamp: str, metrics: dict) -> dict[str, list[dict]]:
    samples = {}
    for task in metrics:
        file = path.parent / f"samples_{task}_{stamp}.jsonl"
        if not file.is_file():
            continue
        rows = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise E2UError(f"samples file {file}: line {number} is not valid JSON ({exc.msg})") from None
            rows.append(_sample_row(file, number, record))
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return samples


def _sample_row(file: Path, number: int, record: dict) -> dict:
    doc = record.get("doc") or {}
    row = {"doc_id": record.get("doc_id", number - 1), "index": doc.get("index"),
           "question": doc.get("question"), "answer": doc.get("answer", record.get("target"))}
    for metric in (*METRICS, *REFUSAL_METRICS, "composite", *(k for k in record if k.startswith(LENS_PREFIX))):
        if metric in record:
            row[metric] = float(record[metric])
    if record.get("filter", "none") == "none":  # other benchmarks' per-document scores (acc, ...)
        for metric in record.get("metrics") or ():
            value = record.get(metric)
            if metric not in row and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric] = float(value)
    response = (record.get("filtered_resps") or record.get("resps") or [None])[0]
    while isinstance(response, list) and response:
        response = response[0]
    if isinstance(response, str):
        try:
            response = ast.literal_eval(response)  # lm-eval stores the response's repr
        except (ValueError, SyntaxError):
            pass
    if isinstance(response, dict):
        row["generation"] = response.get("generation")
    elif isinstance(response, str):
        row["generation"] = response
    return row


def find_results(folders: list[str | Path]) -> list[Path]:
    files = []
    for folder in map(Path, folders):
        if folder.is_file() and folder.suffix == ".json":
            files.append(folder)
            continue
        if not folder.is_dir():
            raise E2UError(f"results folder {folder} does not exist")
        # (a sweep run in progress writes into a hidden ``.<run>.<random>.tmp`` folder)
        found = sorted(p for p in folder.rglob("results_*.json")
                       if not any(part.endswith(".tmp") for part in p.relative_to(folder).parts))
        if not found:
            raise E2UError(f"results folder {folder}: no results_*.json under it (lm-eval writes "
                           "<output_path>/<model>/results_<time>.json)")
        files += found
    return files


def load_runs(folders: list[str | Path], with_samples: bool = True, log=print) -> list[Run]:
    """Every results file under the folders; of several files for the same run (identity and
    tasks), the newest is kept and the others are named in one line each."""
    runs = [read_run(p, with_samples) for p in find_results(folders)]
    newest: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.timestamp):
        key = json.dumps([run.identity(), sorted(run.metrics)], sort_keys=True, default=str)
        if key in newest:
            log(f"e2u: {newest[key].path} and {run.path} are the same run; using the newer {run.path.name}")
        newest[key] = run
    return list(newest.values())
