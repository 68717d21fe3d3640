"""Editor speed against a previous revision, side by side in one run: cold statistics, WISE,
GRACE and AlphaEdit (statistics cached) on TOFU-factual forget requests.

Each stage runs in its own subprocess, once with the code of ``--old-rev`` (checked out into a
temporary git worktree) and once with this tree, on the same model, requests and seed:

  * ``stats``: AlphaEdit's second-moment statistics with an empty cache (its layers, the preset's
    token budget, the preserved questions' key moments);
  * ``wise`` / ``grace``: the whole edit (``apply``);
  * ``alphaedit``: the whole edit with the statistics already cached (both sides read the old
    side's statistics, collected before the timer starts, so the edit alone is compared; the
    ``stats`` row gives the largest relative difference between the two sides' moments).

Per stage and side: wall seconds of the stage alone (model load excluded), peak RSS of the
subprocess (``wait4``), and a sha256 of the result (the moments; the side memory or codebook
tensors and their description; the edited weights), so the report says whether the results are
bit-identical, and if not, the largest relative difference of any result tensor against the old
side's (``max_rel_diff``: the moments of a layer; an edited weight, the codebook's keys/values/
radii or the side memory, when both sides hold the same tensors). The ratio is old seconds / new
seconds.

    python benchmarks/editor_speed.py --old-rev <sha>                           # SmolLM2-135M, 40 facts
    python benchmarks/editor_speed.py --old-rev <sha> --forget-size 4 --tokens 4000 --steps 3   # quick
    python benchmarks/editor_speed.py --old-rev <sha> --json benchmarks/results/editor_speed.json
    python benchmarks/editor_speed.py --old-rev <sha> --stages alphaedit --steps 30 --set L2=50   # same edit
    python benchmarks/editor_speed.py --old-rev <sha> --stages grace --repeats 3   # medians of 3 runs a side
    python benchmarks/editor_speed.py --old-rev <sha> --stages alphaedit --old-set v_loss_threshold=0.05   # new preset vs old

``--steps`` and ``--set KEY=VALUE`` apply to both sides, so two revisions whose presets differ
time the same edit (then ``identical`` compares like with like); ``--old-set KEY=VALUE`` applies
to the old side only, so a changed preset is timed against the previous one on the previous code
(then the two edits differ, and ``nll_after``/``unreached`` say how).

``--stage-args`` of a child (internal) are the same options; run the children with
``nice``/``OMP_NUM_THREADS`` as the parent was run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
STAGES = ("stats", "wise", "grace", "alphaedit")


def options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", help="git revision of the previous implementation (e.g. a sha of main)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--pretrained", default="smollm2-135m-instruct")
    parser.add_argument("--forget-size", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=None, help="mom2_n_tokens (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of every optimisation (WISE n_iter, GRACE n_iter, v_num_grad_steps; "
                             "default: the presets')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an hparam of the stage's method on both sides (repeatable), e.g. --set L2=50 "
                             "when the two revisions' presets differ and the same edit is to be timed")
    parser.add_argument("--old-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an hparam of the old side only, applied after --set (repeatable): the "
                             "previous preset on the old code against this tree's preset, e.g. "
                             "--old-set v_loss_threshold=0.05 when a preset changed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each side per stage, alternating old and new; the row gives the "
                             "median seconds and median peak RSS, and every run's (peak RSS moves by "
                             "about 0.1 GiB between runs of the same code)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    # Internal: one stage of one side.
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------- one stage (child)


def sha256_of_tensors(tensors: dict, extra=None) -> str:
    import torch

    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def forward_only_throughput(model, tokenizer, hparams, layers, env) -> float | None:
    """Tokens/s of the statistics' forward alone (the same batches, stopped at the deepest
    module, no moments): the limit of the collection. None for a revision without the batching
    helpers."""
    import torch

    from e2u_models.editing import stats

    if not hasattr(stats, "stats_forward_batches"):
        return None
    spec = stats.StatsSpec.of(hparams)
    corpus = stats.resolve_corpus(spec.stats_corpus, env.render)
    request = stats.StatsRequest(modules=tuple(spec.module_tmp.format(l) for l in layers),
                                 n_tokens=spec.mom2_n_tokens, max_length=spec.mom2_max_length)
    rows = stats.corpus_rows(tokenizer, corpus, request)
    deepest = dict(model.named_modules())[request.modules[-1]]

    def stop(_):
        raise stats.StopForward

    started = time.perf_counter()
    with stats.trace(model, inputs={deepest: stop}), torch.no_grad():
        for _, batch in stats.stats_forward_batches(model, tokenizer, rows, request):
            stats.forward_until_stopped(model, **batch)
    return round(sum(map(len, rows)) / (time.perf_counter() - started), 1)


def run_child(args) -> dict:
    sys.path.insert(0, args.root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dataclasses

    from e2u_models.architectures import with_architecture
    from e2u_models.editing.adapters import adapters_of
    from e2u_models.editing.stats import StatsSpec, statistics_for
    from e2u_models.hparams import load_hparams, resolve_hparams_path
    from e2u_models.methods import get_method
    from e2u_models.model import E2ULM

    lm = E2ULM(pretrained=args.pretrained, method="none", forget_size=args.forget_size, device="cpu")
    model, tokenizer = lm.model, lm.tokenizer
    forget = lm.requests_for(lm.splits.forget, with_targets=True)
    env = dataclasses.replace(lm._method_env(), cache_dir=args.cache_dir, log=lambda *_: None)
    name = "alphaedit" if args.child == "stats" else args.child
    method = get_method(name)
    overrides = {}
    if args.tokens is not None and name in ("alphaedit",):
        overrides["mom2_n_tokens"] = args.tokens
    if args.steps is not None:
        overrides[{"alphaedit": "v_num_grad_steps"}.get(name, "n_iter")] = args.steps
    for setting in args.set:  # a string, typed by the hparams' own coercion as a model arg is
        key, _, value = setting.partition("=")
        overrides[key] = value
    hparams = load_hparams(method.HyperParams, name, resolve_hparams_path(name, None, model.config), overrides)
    hparams = with_architecture(hparams, model)
    row: dict = {}
    if name == "alphaedit":
        layers = hparams.resolved_layers(model.config.num_hidden_layers)
        if args.child == "alphaedit":  # statistics cached before the timer starts
            statistics_for(model, tokenizer, StatsSpec.of(hparams), layers, env)
    started = time.perf_counter()
    if args.child == "stats":
        moments, _ = statistics_for(model, tokenizer, StatsSpec.of(hparams), layers, env)
        seconds = time.perf_counter() - started
        row["sha256"] = sha256_of_tensors({str(k): v for k, v in moments.items()})
        row["tokens"] = hparams.mom2_n_tokens
        row["tokens_per_s"] = round(hparams.mom2_n_tokens / seconds, 1)
        from safetensors.torch import save_file

        save_file({str(k): v.cpu().contiguous() for k, v in moments.items()}, f"{args.cache_dir}.moments.safetensors")
        limit = forward_only_throughput(model, tokenizer, hparams, layers, env)
        if limit is not None:
            row["forward_tokens_per_s"] = limit
    else:
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        report = method.apply(model, tokenizer, forget, None, hparams, seed=0, env=env)
        seconds = time.perf_counter() - started
        changed = {n: p for n, p in model.named_parameters() if not bool((p == original[n]).all())}
        adapters = {f"{k}.{t}": v for k, a in enumerate(adapters_of(model)) for t, v in a.tensors().items()}
        described = [a.describe() for a in adapters_of(model)]
        row["sha256"] = sha256_of_tensors({**changed, **adapters}, described)
        if args.result_file:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in {**changed, **adapters}.items()},
                      args.result_file)
        if "value_training" in report.details:
            row["value_training"] = report.details["value_training"]
        verification = report.details["verification"]
        row["nll_after"] = verification["mean_nll_after"]
        row["unreached"] = len(verification["unreached"])
    row["seconds"] = round(seconds, 2)
    return row


# --------------------------------------------------------------------------- both sides (parent)


def child_command(stage: str, side: str, root: Path, cache_dir: str, args, result_file: Path) -> list[str]:
    """The subprocess of one stage of one side: the shared options, and on the old side its own
    ``--old-set`` hparams after the shared ``--set`` ones (a later setting wins)."""
    command = [sys.executable, str(HERE), "--child", stage, "--root", str(root), "--cache-dir", cache_dir,
               "--pretrained", args.pretrained, "--forget-size", str(args.forget_size),
               "--result-file", str(result_file)]
    if args.tokens is not None:
        command += ["--tokens", str(args.tokens)]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    for setting in args.set + (args.old_set if side == "old" else []):
        command += ["--set", setting]
    return command


def run_side(stage: str, side: str, root: Path, cache_dir: str, args, result_file: Path) -> dict:
    command = child_command(stage, side, root, cache_dir, args, result_file)
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, env={**os.environ, "PYTHONPATH": str(root)})
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = out.read().strip().splitlines()
    if process.returncode != 0 or not lines:
        raise SystemExit(f"editor_speed: the {stage} stage failed in {root} (exit {process.returncode})")
    row = json.loads(lines[-1])
    row["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    return row


def median_run(runs: list[dict]) -> dict:
    """One side's row over its repeats: the last run's figures with the median seconds and
    median peak RSS, and with several runs every run's seconds and peak RSS."""
    row = dict(runs[-1])
    row["seconds"] = round(statistics.median(r["seconds"] for r in runs), 2)
    row["peak_rss_gib"] = round(statistics.median(r["peak_rss_gib"] for r in runs), 2)
    if len(runs) > 1:
        row["runs_s"] = [r["seconds"] for r in runs]
        row["runs_rss_gib"] = [r["peak_rss_gib"] for r in runs]
    return row


def largest_difference(reference: Path, other: Path) -> float | None:
    """The largest relative Frobenius difference ‖X − X_ref‖ / ‖X_ref‖ over the tensors (the
    moments of each layer; the edited weights, codebook or side memory); None when the two hold
    different tensors; 0.0 when neither side changed any tensor."""
    from safetensors.torch import load_file

    if not (reference.is_file() and other.is_file()):
        return None
    ref, new = load_file(str(reference)), load_file(str(other))
    if set(ref) != set(new) or any(ref[k].shape != new[k].shape for k in ref):
        return None
    largest = max((float((new[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp(min=1e-30))
                   for k in ref), default=0.0)
    return float(f"{largest:.3g}")


def compare(stage: str, old: dict, new: dict) -> dict:
    """One output row: both sides' seconds and peak RSS, the ratio old/new, whether the results'
    hashes are equal, and the stage's own figures of each side."""
    row = {"stage": stage, "old_s": old["seconds"], "new_s": new["seconds"],
           "ratio": round(old["seconds"] / max(new["seconds"], 1e-9), 2),
           "old_rss_gib": old["peak_rss_gib"], "new_rss_gib": new["peak_rss_gib"],
           "identical": old["sha256"] == new["sha256"]}
    for key in ("tokens_per_s", "forward_tokens_per_s", "max_rel_diff", "nll_after", "unreached", "value_training",
                "runs_s", "runs_rss_gib"):
        for side, result in (("old", old), ("new", new)):
            if key in result:
                row[f"{side}_{key}"] = result[key]
    return row


def main() -> None:
    args = options().parse_args()
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return
    if not args.old_rev:
        raise SystemExit("editor_speed: give --old-rev <git revision> (the previous implementation)")
    if args.repeats < 1:
        raise SystemExit(f"editor_speed: --repeats takes a count >= 1, got {args.repeats}")
    malformed = [s for s in args.set + args.old_set if "=" not in s or not s.partition("=")[0]]
    if malformed:
        raise SystemExit(f"editor_speed: --set and --old-set take KEY=VALUE (an hparam and its value), "
                         f"got {malformed[0]!r}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"editor_speed: unknown stage {unknown[0]!r}; accepted: {', '.join(STAGES)}")
    new_root = HERE.parents[1]
    sha = subprocess.run(["git", "rev-parse", args.old_rev], cwd=new_root, capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"editor_speed: --old-rev {args.old_rev!r} is not a git revision of {new_root}")
    old_sha = sha.stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="e2u-editor-speed-"))
    old_root = scratch / "old"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_root), old_sha], cwd=new_root, check=True,
                   capture_output=True)
    rows = []
    try:
        for stage in stages:
            runs = {"old": [], "new": []}
            for _ in range(args.repeats):
                for side, root in (("old", old_root), ("new", new_root)):
                    if stage == "stats":  # an empty cache: cold
                        cache = scratch / f"cache-{side}"
                        shutil.rmtree(cache, ignore_errors=True)
                    else:  # both editors read the same statistics (the old side's, filled on first use)
                        cache = scratch / "cache-old"
                    runs[side].append(run_side(stage, side, root, str(cache), args,
                                               scratch / f"{stage}-{side}.safetensors"))
                    print(f"{stage} {side}: {json.dumps(runs[side][-1])}", file=sys.stderr, flush=True)
            results = {side: median_run(side_runs) for side, side_runs in runs.items()}
            for side in results:
                reference, other = ((scratch / "cache-old.moments.safetensors", scratch / f"cache-{side}.moments.safetensors")
                                    if stage == "stats" else
                                    (scratch / f"{stage}-old.safetensors", scratch / f"{stage}-{side}.safetensors"))
                difference = largest_difference(reference, other)
                if difference is not None:
                    results[side]["max_rel_diff"] = difference
            row = compare(stage, results["old"], results["new"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=new_root, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    from e2u_models.provenance import cpu_name

    # The seconds are this machine's: the rows say which one, as command_speed.py's do.
    settings = {"old_rev": old_sha[:12], "forget_size": args.forget_size, "tokens": args.tokens,
                "steps": args.steps, "set": " ".join(args.set) or None,
                "old_set": " ".join(args.old_set) or None, "repeats": args.repeats,
                "pretrained": args.pretrained,
                "cpu": cpu_name(), "cpus": os.cpu_count()}
    columns = list(dict.fromkeys(k for row in rows for k in row))
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    print(json.dumps(settings))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([{**row, **{k: v for k, v in settings.items() if v is not None}}
                                               for row in rows], indent=1))


if __name__ == "__main__":
    main()
