"""The ``e2u`` command: ``sweep``, ``report``, ``leaderboard``, ``regress``, ``docs``.

Input problems print as one line (``e2u: error: ...``) and exit with status 2; ``regress`` exits
with 1 when a number is outside its tolerance.
"""

from __future__ import annotations

import argparse
import sys

from e2u_tasks.errors import E2UError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2u", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a grid of lm-eval runs (resumable)")
    sweep.add_argument("config", help="sweep YAML (see e2u_experiments/sweep.py or configs/)")
    sweep.add_argument("--output-dir", help="results folder (overrides the config's output_dir)")
    sweep.add_argument("--shard", help="run only runs i, i+n, i+2n, ... : 'i/n' with 0 <= i < n")
    sweep.add_argument("--dry-run", action="store_true", help="print each pending run's command")
    sweep.add_argument("--launcher", default="",
                       help="prefix of every lm-eval command, e.g. 'srun -n1 --gres=gpu:1'")

    report = sub.add_parser("report", help="paper tables (Markdown, CSV) and figures (PNG)")
    report.add_argument("results", nargs="+", help="folder(s) searched for results_*.json, and/or "
                        "leaderboard files (their entries and per-document scores)")
    report.add_argument("--out", required=True, help="folder for the tables and figures")
    report.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    report.add_argument("--case-study", type=int, default=6, help="questions in the case study")
    report.add_argument("--no-figures", action="store_true", help="tables only")
    report.add_argument("--dataset", nargs="+", help="only the runs on these datasets (as the tables name them)")
    report.add_argument("--forget-seed", nargs="+", type=int,
                        help="only the runs whose forget set was drawn with these seeds")

    board = sub.add_parser("leaderboard", help="write a leaderboard file from results")
    board.add_argument("results", nargs="+", help="folder(s) searched for results_*.json")
    board.add_argument("--out", required=True, help="leaderboard file to write (.yaml or .json)")
    board.add_argument("--name", default="", help="a title for the leaderboard")
    board.add_argument("--tolerance", type=float, default=1e-6,
                       help="absolute tolerance of every metric that --repeats does not measure "
                            "(default 1e-6)")
    board.add_argument("--repeats", nargs="+", default=None,
                       help="folder(s) of re-runs of some of the runs (another --batch_size, another "
                            "process): each metric's tolerance is 10x the largest difference they show")
    board.add_argument("--update", default=None,
                       help="an existing leaderboard: its entries that no new run replaces are kept "
                            "(with their per-document scores)")
    board.add_argument("--note", default="", help="a sentence on where and how it was measured")

    regress = sub.add_parser("regress", help="check results against a leaderboard (CI)")
    regress.add_argument("--leaderboard", required=True, help="leaderboard file (.yaml or .json)")
    regress.add_argument("--results", required=True, nargs="+", help="results folder(s)")
    regress.add_argument("--tolerance", type=float, default=None,
                         help="override every entry's tolerance (e.g. across machines)")
    regress.add_argument("--mode", default="auto", choices=("auto", "exact", "statistical"),
                         help="exact: every number within its tolerance; statistical: paired "
                              "per-document test against the leaderboard's scores; auto (default): "
                              "exact where the environment fingerprints match, else statistical")
    regress.add_argument("--margin", type=float, default=None,
                         help="statistical mode: override every metric's practical margin")
    regress.add_argument("--allow-missing", action="store_true",
                         help="leaderboard entries without a result are reported, not failures")

    docs = sub.add_parser("docs", help="regenerate the generated blocks of README.md and docs/*.md")
    docs.add_argument("--root", default=".", help="the repository checkout (default: .)")
    docs.add_argument("--leaderboard", default=None,
                      help="leaderboard for the results tables (default leaderboards/smollm2-135m.yaml)")
    docs.add_argument("--check", action="store_true",
                      help="only report stale blocks (exit 1 if any); write nothing")
    docs.add_argument("--no-bad-input", action="store_true",
                      help="skip the bad-input matrix (python -m tests.test_bad_input_matrix)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            from e2u_experiments.sweep import SweepConfig, parse_shard, run_sweep

            shard = parse_shard(args.shard)
            config = SweepConfig.load(args.config, args.output_dir)
            return 1 if run_sweep(config, shard, dry_run=args.dry_run, launcher=args.launcher,
                                 log=_say) else 0
        if args.command == "report":
            from e2u_experiments.report import write_report

            write_report(args.results, args.out, bootstrap=args.bootstrap, seed=args.seed,
                         case_study=args.case_study, figures=not args.no_figures, log=_say,
                         datasets=args.dataset, forget_seeds=args.forget_seed)
            return 0
        if args.command == "leaderboard":
            from e2u_experiments.leaderboard import write_leaderboard

            write_leaderboard(args.results, args.out, name=args.name, tolerance=args.tolerance,
                              note=args.note, repeats=args.repeats,
                              update=args.update, log=_say)
            return 0
        if args.command == "regress":
            from e2u_experiments.leaderboard import regress

            return regress(args.leaderboard, args.results, tolerance=args.tolerance,
                           allow_missing=args.allow_missing, mode=args.mode, margin=args.margin,
                           log=_say)
        if args.command == "docs":
            from e2u_experiments.docs import write_docs

            return write_docs(args.root, args.leaderboard, check=args.check,
                              bad_input=not args.no_bad_input, log=_say)
    except E2UError as exc:
        print(f"e2u: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _say(line: str) -> None:
    print(line, flush=True)


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
