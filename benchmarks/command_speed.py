"""Time the whole ``lm_eval --model e2u`` command of a previous revision and of this tree, side by side.

The previous revision is checked out into a temporary git worktree; both trees run the same command
(``lm_eval --model e2u --model_args method=none --tasks tofu_factual`` by default) in their own
subprocess, alternating old/new for ``--repeats`` rounds, so machine load hits both alike. Per run:
wall seconds of the whole command, the edit and evaluation seconds from the run card
(``config.e2u.run_card``) and the process's peak RSS. The summary gives the medians, their ratios
(old / new, > 1 means this tree is faster) and how the results compare with the first old run:
whether every generated answer and every metric of the generated text (ROUGE, refusal, entity and
answer leak) is identical, and for the teacher-forced numbers (``prob``, ``mrr``, ``hit_rate``,
``lens_*``), which a different batch layout moves in the last bits, the largest difference of each
metric and of a token log-probability, and how many samples' ranks or lens ranks differ. With
``--noise-batch-size N`` the previous revision also runs once with ``--batch_size N``: the same
figures for that run (``noise_batch_size_N_*``) are the float noise a batch layout alone causes.

    python benchmarks/command_speed.py [--old-rev <sha>] [--repeats 2] [--limit N] \\
        [--noise-batch-size 16] [--json benchmarks/results/command_speed.json]

The command writes its results and samples (``--output_path``, ``--log_samples``) to a temporary
folder: that is how they are compared. Set ``E2U_DATA_DIR`` (default: ``../shared/data`` from the
repository) and run on a quiet machine; ``HF_HUB_OFFLINE=1`` is set for the subprocesses.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def default_old_rev() -> str:
    """The commit this branch left ``main`` at (``git merge-base HEAD main``)."""
    return git("merge-base", "HEAD", "main")


def lm_eval_program() -> str:
    """The ``lm_eval`` console script of this interpreter's environment."""
    beside = Path(sys.executable).with_name("lm_eval")
    found = str(beside) if beside.is_file() else shutil.which("lm_eval")
    if not found:
        sys.exit("command_speed: no lm_eval console script next to this Python or on PATH")
    return found


def command(output: Path, model_args: str, tasks: str, limit: int | None, batch_size: int | None = None) -> list[str]:
    argv = [lm_eval_program(), "--model", "e2u", "--model_args", model_args, "--tasks", tasks,
            "--output_path", str(output), "--log_samples"]
    return (argv + (["--limit", str(limit)] if limit is not None else [])
            + (["--batch_size", str(batch_size)] if batch_size is not None else []))


def run_once(tree: Path, argv: list[str], log: Path) -> dict:
    """Run ``argv`` with ``tree`` first on the import path; wall seconds and peak RSS of the child."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1"}
    env.setdefault("E2U_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    with open(log, "w", encoding="utf-8") as out:
        started = time.perf_counter()
        child = subprocess.Popen(argv, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"command_speed: {' '.join(argv)} failed in {tree} (exit {child.returncode}); see {log}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss * scale / 2**20, 1)}


def read_outputs(folder: Path) -> tuple[dict, dict]:
    """(results JSON, samples by task) that one run wrote under ``folder``."""
    results = sorted(folder.rglob("results_*.json"))
    if len(results) != 1:
        sys.exit(f"command_speed: expected one results file under {folder}, found {len(results)}")
    samples = {}
    for path in sorted(folder.rglob("samples_*.jsonl")):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return json.loads(results[0].read_text(encoding="utf-8")), samples


TEACHER_FORCED = ("prob", "mrr", "hit_rate", "lens_")  # metric names read from log-probabilities and ranks


def is_teacher_forced(key: str) -> bool:
    """Whether a results key (``prob,none``, ``lens_hit@10_stderr,none``) is a teacher-forced metric:
    the batch layout moves those in the last bits; every metric of the generated text must not move."""
    return key.split(",")[0].startswith(TEACHER_FORCED)


def response(text: str):
    """A logged e2u answer (lm-eval writes the dict's ``repr``), or the text of another response."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def comparable(results: dict, samples: dict) -> tuple[dict, dict, dict]:
    """A run split three ways: its metrics (every task and group), its answers (per sample the
    document, the arguments and the generated answer, or the whole response of other request types)
    and its teacher-forced statistics (per sample the log-probabilities, ranks and logit-lens ranks)."""
    metrics = {"results": results.get("results"), "groups": results.get("groups")}
    answers, forced = {}, {}
    for task, rows in samples.items():
        for sample in rows:
            resps = [response(r) for group in sample["resps"] for r in group]
            said = [r.get("generation") if isinstance(r, dict) else r for r in resps]
            answers.setdefault(task, []).append((sample["doc_id"], sample["doc"], sample["arguments"], said))
            forced.setdefault(task, []).append([{**{k: r.get(k) for k in ("tokens", "logprobs", "ranks")},
                                                 "lens_rank": lens_rank(r)} for r in resps if isinstance(r, dict)])
    return metrics, answers, forced


def lens_rank(answer: dict) -> int | None:
    """The best logit-lens rank of an answer: ``lens_rank``, or the best of every layer's
    ``lens_ranks`` where a revision reports those."""
    if "lens_ranks" in answer:
        return min(answer["lens_ranks"])
    return answer.get("lens_rank")


def metric_differences(reference: dict, other: dict) -> dict:
    """Per metric name, the largest |difference| over tasks and groups (only those that differ)."""
    largest: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (reference.get(section) or {}).items():
            for key, value in values.items():
                theirs = ((other.get(section) or {}).get(task) or {}).get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value != theirs:
                    gap = abs(value - theirs) if isinstance(theirs, (int, float)) else float("inf")
                    largest[key] = max(largest.get(key, 0.0), gap)
    return largest


def teacher_forced_differences(reference: dict, other: dict) -> dict:
    """The largest |difference| of a token log-probability, and the samples whose ranks or lens ranks differ."""
    logprob, ranks, lens = 0.0, 0, 0
    for task, rows in reference.items():
        for mine, theirs in zip(rows, other.get(task, [])):
            for a, b in zip(mine, theirs):
                if a["tokens"] != b["tokens"]:  # other gold tokens: not comparable number by number
                    logprob = float("inf")
                logprob = max([logprob] + [abs(x - y) for x, y in zip(a["logprobs"] or [], b["logprobs"] or [])])
                ranks += a["ranks"] != b["ranks"]
                lens += a["lens_rank"] != b["lens_rank"]
    return {"max_logprob_diff": logprob, "samples_other_ranks": ranks, "samples_other_lens_ranks": lens}


def identity_report(reference: tuple, runs: list[tuple]) -> dict:
    """How every run compares with ``reference``: answers and the metrics of the generated text must be
    identical; teacher-forced numbers may differ by float rounding, reported as the largest difference."""
    metric_gaps: dict[str, float] = {}
    forced = {"max_logprob_diff": 0.0, "samples_other_ranks": 0, "samples_other_lens_ranks": 0}
    for run in runs:
        for key, gap in metric_differences(reference[0], run[0]).items():
            metric_gaps[key] = max(metric_gaps.get(key, 0.0), gap)
        for key, value in teacher_forced_differences(reference[2], run[2]).items():
            forced[key] = max(forced[key], value)
    return {
        "identical_answers": all(run[1] == reference[1] for run in runs),
        "identical_text_metrics": not any(not is_teacher_forced(key) for key in metric_gaps),
        "identical_metrics": not metric_gaps,
        "max_teacher_forced_metric_diff": {key: gap for key, gap in sorted(metric_gaps.items())
                                           if is_teacher_forced(key)},
        **forced,
    }


def run_card_seconds(results: dict) -> dict:
    card = results["config"]["e2u"]["run_card"]
    return {"edit_s": card["edit"]["seconds"], "evaluation_s": card["evaluation"]["seconds"]}


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default=None, help="previous revision (default: git merge-base HEAD main)")
    parser.add_argument("--repeats", type=int, default=2, help="old/new rounds (default 2)")
    parser.add_argument("--model-args", default="method=none")
    parser.add_argument("--tasks", default="tofu_factual")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--noise-batch-size", type=int, default=None,
                        help="also run the previous revision once at this --batch_size: how far its "
                             "teacher-forced numbers move is the float noise the new ones are held to")
    args = parser.parse_args()
    if args.repeats < 1 or (args.noise_batch_size is not None and args.noise_batch_size < 1):
        parser.error("--repeats and --noise-batch-size must be at least 1")
    old_rev = git("rev-parse", "--verify", (args.old_rev or default_old_rev()) + "^{commit}")
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if old_rev == head and not dirty:
        parser.error(f"--old-rev {old_rev[:12]} is this tree's commit; give the revision to compare against")

    from e2u_models.provenance import cpu_name

    load_before = os.getloadavg()
    runs: list[dict] = []
    outputs: dict[str, list] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="e2u-command-speed-") as scratch:
        scratch = Path(scratch)
        old_tree = scratch / "old-tree"
        git("worktree", "add", "--detach", str(old_tree), old_rev)
        try:
            for repeat in range(args.repeats):
                for label, tree in (("old", old_tree), ("new", ROOT)):
                    folder = scratch / f"{label}-{repeat}"
                    figures = run_once(tree, command(folder, args.model_args, args.tasks, args.limit),
                                       scratch / f"{label}-{repeat}.log")
                    results, samples = read_outputs(folder)
                    outputs[label].append(comparable(results, samples))
                    runs.append({"run": label, "repeat": repeat + 1, **figures, **run_card_seconds(results)})
                    print(json.dumps(runs[-1]), file=sys.stderr)
            if args.noise_batch_size is not None:
                folder = scratch / "old-noise"
                run_once(old_tree, command(folder, args.model_args, args.tasks, args.limit, args.noise_batch_size),
                         scratch / "old-noise.log")
                noise = identity_report(outputs["old"][0], [comparable(*read_outputs(folder))])
        finally:
            git("worktree", "remove", "--force", str(old_tree))

    old_runs = [r for r in runs if r["run"] == "old"]
    new_runs = [r for r in runs if r["run"] == "new"]
    reference = outputs["old"][0]
    summary = {
        "command": f"lm_eval --model e2u --model_args {args.model_args} --tasks {args.tasks}"
                   + (f" --limit {args.limit}" if args.limit is not None else ""),
        "old_rev": old_rev[:12], "new_rev": head[:12] + ("+changes" if dirty else ""),
        "repeats": args.repeats,
        "old_wall_s": median_of(old_runs, "wall_s"), "new_wall_s": median_of(new_runs, "wall_s"),
        "wall_ratio": round(median_of(old_runs, "wall_s") / median_of(new_runs, "wall_s"), 2),
        "old_evaluation_s": median_of(old_runs, "evaluation_s"),
        "new_evaluation_s": median_of(new_runs, "evaluation_s"),
        "evaluation_ratio": round(median_of(old_runs, "evaluation_s") / median_of(new_runs, "evaluation_s"), 2),
        "old_peak_rss_mib": max(r["peak_rss_mib"] for r in old_runs),
        "new_peak_rss_mib": max(r["peak_rss_mib"] for r in new_runs),
        **identity_report(reference, outputs["old"][1:] + outputs["new"]),
        **({f"noise_batch_size_{args.noise_batch_size}_{key}": value for key, value in noise.items()}
           if args.noise_batch_size is not None else {}),
        "cpu": cpu_name(), "cpus": os.cpu_count(),
        "load_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    figures = {"summary": [summary], "runs": runs}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
