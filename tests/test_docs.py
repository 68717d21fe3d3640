"""The docs are checked, not trusted: generated blocks match their generator (``e2u docs``), the
README's results equal the leaderboard's, and every fenced ``lm_eval``/``e2u`` command parses with
the real parsers (lm-eval's CLI, ``e2u_experiments.cli.build_parser()``) and e2u's model-arg sorting.
No model is loaded and nothing is run.

A fenced command meant to fail carries a trailing ``# fails: <why>`` comment and must be rejected.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from e2u_experiments import docs
from e2u_experiments.runs import split_of
from e2u_tasks.errors import E2UError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
SKIPPED_LANGUAGES = {"yaml", "python", "bibtex", "json", "text"}  # diagrams, configs, code
E2U_TASK_PREFIXES = ("tofu_", "pistol", "e2u_", "facts_", "known_facts")


# --------------------------------------------------------------------------- generated blocks


@pytest.fixture(scope="module")
def blocks():
    return docs.generate_blocks(ROOT)


def test_every_generated_block_is_current(blocks):
    assert docs.stale_blocks(ROOT, blocks) == [], "generated docs are stale: run `e2u docs`"


def test_each_generated_block_appears_somewhere(blocks):
    names = {name for path in DOC_FILES for name in docs.block_names(path.read_text(encoding="utf-8"))}
    assert set(blocks) <= names, f"blocks never placed: {sorted(set(blocks) - names)}"


def test_a_changed_leaderboard_number_makes_the_results_blocks_stale(tmp_path):
    board = yaml.safe_load((ROOT / docs.LEADERBOARD).read_text(encoding="utf-8"))
    for metrics in (board["entries"][0]["metrics"], board["entries"][-1]["metrics"]):
        task = next(t for t in metrics if t.endswith("_forget"))  # a pooled entry and a single one
        metrics[task]["rouge1_recall"]["value"] += 0.1
    copy = tmp_path / "leaderboards" / docs.LEADERBOARD.name
    copy.parent.mkdir()
    copy.write_text(yaml.safe_dump(board, sort_keys=False), encoding="utf-8")
    assert docs.stale_blocks(ROOT, leaderboard=copy) == [
        "README.md: results-glance", "docs/experiments.md: results-full"]
    # the same copy without the change is current again: only the number made the difference
    shutil.copy(ROOT / docs.LEADERBOARD, copy)
    assert docs.stale_blocks(ROOT, leaderboard=copy) == []


def test_the_check_command_reports_stale_blocks(tmp_path):
    """`e2u docs --check` on a copy of the checkout with one hand-edited generated number."""
    for name in ("README.md", "docs", "leaderboards", "benchmarks/results"):
        source = ROOT / name
        if source.exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    readme = tmp_path / "README.md"
    text = readme.read_text(encoding="utf-8")
    body = text.split("<!-- generated:results-glance -->")[1]
    edited = body.replace("| none | ", "| none | 9", 1)
    readme.write_text(text.replace(body, edited), encoding="utf-8")
    lines: list[str] = []
    assert docs.write_docs(tmp_path, check=True, bad_input=False, log=lines.append) == 1
    assert lines == ["e2u docs: stale generated block README.md: results-glance"]
    assert docs.write_docs(tmp_path, bad_input=False, log=lines.append) == 0
    assert docs.write_docs(tmp_path, check=True, bad_input=False, log=lines.append) == 0


def _readme_tables() -> list[list[list[str]]]:
    """The README's results tables, each a list of rows of cells (header first)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- generated:results-glance -->")[1].split("<!-- /generated:results-glance -->")[0]
    tables, current = [], None
    for line in block.splitlines():
        if line.startswith("| "):
            if current is None:
                current = []
                tables.append(current)
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif not line.startswith("|"):
            current = None
    return tables


def _label(entry: dict) -> str:
    options = entry.get("options") or {}
    return entry["method"] + (f" ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else "")


def _numbers(entry: dict) -> dict[str, float]:
    metrics = entry["metrics"]
    prefix = next(t for t in metrics if t.endswith("_forget"))[: -len("_forget")]
    group = next(t for t, v in metrics.items() if "composite" in v and split_of(t) is None)
    return {split: metrics[f"{prefix}_{split}"]["rouge1_recall"]["value"] for split in ("forget", "retain", "rephrase")} \
        | {"composite": metrics[group]["composite"]["value"]}


def test_readme_results_equal_the_leaderboard():
    """Every number of the README's results tables is the leaderboard's, rounded as printed: a
    dataset run at one seed shows each entry; one run at several seeds shows, for the methods run
    at two or more, the mean ± sd over the seeds (retain also against none's of the same seed)."""
    import statistics

    board = yaml.safe_load((ROOT / docs.LEADERBOARD).read_text(encoding="utf-8"))
    by_dataset: dict[str, list[dict]] = {}
    for entry in board["entries"]:
        by_dataset.setdefault(str(entry.get("dataset")), []).append(entry)
    tables = _readme_tables()
    assert len(tables) == len(by_dataset)
    for (dataset, entries), table in zip(by_dataset.items(), tables):
        header, rows = table[0], {row[0]: row[1:] for row in table[1:]}
        if "seeds" not in header:
            assert len(rows) == len(entries), dataset
            for entry in entries:
                n = _numbers(entry)
                expected = [n["forget"], n["retain"], n["rephrase"], n["composite"]]
                assert rows[_label(entry)] == [f"{round(v, 3):.3f}" for v in expected], _label(entry)
            continue

        def mean_sd(values):
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

        none = {e["forget_seed"]: _numbers(e)["retain"] for e in entries if _label(e) == "none"}
        labels = {_label(e) for e in entries}
        pooled = {label for label in labels if len({e["forget_seed"] for e in entries if _label(e) == label}) > 1}
        assert set(rows) == pooled, dataset
        for label in pooled:
            mine = [e for e in entries if _label(e) == label]
            n = [_numbers(e) for e in mine]
            ratios = [x["retain"] / none[e["forget_seed"]] for x, e in zip(n, mine) if e["forget_seed"] in none]
            expected = [" ".join(str(s) for s in sorted({e["forget_seed"] for e in mine}, key=str)),
                        mean_sd([x["forget"] for x in n]), mean_sd([x["retain"] for x in n]),
                        mean_sd(ratios) if len(ratios) > 1 else f"{ratios[0]:.3f}",
                        mean_sd([x["rephrase"] for x in n]), mean_sd([x["composite"] for x in n])]
            assert rows[label] == expected, (dataset, label)


def _entry(method: str, dataset: str, forget_seed: int, forget: float, retain: float, **options) -> dict:
    prefix, group = ("facts", "known_facts") if dataset == "known_facts" else ("tofu", "tofu_factual")
    metrics = {f"{prefix}_forget": {"rouge1_recall": {"value": forget}},
               f"{prefix}_rephrase": {"rouge1_recall": {"value": forget + 0.1}},
               f"{prefix}_retain": {"rouge1_recall": {"value": retain}},
               group: {"composite": {"value": 1 - forget + retain}}}
    return {"model": "m", "method": method, "options": options, "dataset": dataset, "forget_size": 40,
            "forget_seed": forget_seed, "seed": forget_seed, "limit": None, "metrics": metrics}


def test_the_glance_gives_mean_and_spread_over_seeds_per_dataset():
    """Seeds pooled per dataset and method (retain against none's of the same seed); a dataset
    run at one seed lists its entries as they are."""
    board = {"name": "b", "entries": [
        _entry("none", "known_facts", 0, 1.0, 1.0), _entry("none", "known_facts", 1, 1.0, 0.8),
        _entry("grace", "known_facts", 0, 0.0, 0.9), _entry("grace", "known_facts", 1, 0.1, 0.8),
        _entry("rome", "known_facts", 0, 0.2, 0.5, merge=5),
        _entry("none", "tofu_factual", 0, 0.5, 0.4), _entry("gd", "tofu_factual", 0, 0.25, 0.3)]}
    text = docs.glance_block(board, "board.yaml")
    assert "**known_facts**, mean ± sd over seeds" in text and "**tofu_factual**" in text
    assert "| grace | 0 1 | 0.050 ± 0.071 | 0.850 ± 0.071 | 0.950 ± 0.071 | 0.150 ± 0.071 | 1.800 ± 0.141 |" in text
    assert "rome (merge=5)" not in text  # one seed: no pooled row
    assert "| gd | 0.250 | 0.300 | 0.350 | 1.050 |" in text
    full = docs.full_block(board, "board.yaml")
    assert "| method | dataset | seed | forget |" in full and "| grace | known_facts | 1 | 0.100 /" in full


# --------------------------------------------------------------------------- fenced commands


def fenced_commands() -> list[tuple[str, str, bool]]:
    """(where, command, expected to fail) for every fenced `lm_eval ...` / `e2u ...` line."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1).strip().lower() in SKIPPED_LANGUAGES:
                continue
            lines = match.group(2).replace("\\\n", " ").splitlines()
            prompted = any(line.startswith("$ ") for line in lines)
            line_no = text[:match.start()].count("\n") + 2
            for offset, line in enumerate(lines):
                if prompted:
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                line = line.strip()
                if not line.startswith(("lm_eval ", "e2u ")):
                    continue
                command, _, comment = line.partition(" #")
                fails = comment.strip().startswith("fails:")
                found.append((f"{path.relative_to(ROOT)}:{line_no + offset}", command.strip(), fails))
    return found


COMMANDS = fenced_commands()


def test_the_docs_have_commands_of_both_kinds():
    kinds = {command.split()[0] for _, command, _ in COMMANDS}
    assert kinds == {"lm_eval", "e2u"} and len(COMMANDS) >= 20
    assert any(fails for *_, fails in COMMANDS), "the troubleshooting page shows commands that fail"


def _check_e2u(argv: list[str]) -> None:
    from e2u_experiments.cli import build_parser

    build_parser().parse_args(argv)


def _check_lm_eval(argv: list[str]) -> None:
    from lm_eval._cli import HarnessCLI

    from e2u_models.args import sort_model_args
    from e2u_models.methods import get_method

    cli = HarnessCLI()
    subcommands = cli._subparsers.choices
    args = cli._parser.parse_args(argv if argv and argv[0] in subcommands else ["run", *argv])
    for task in args.tasks or []:
        if task.startswith(E2U_TASK_PREFIXES):
            assert (ROOT / "task_configs" / f"{task}.yaml").is_file(), f"no e2u task {task!r}"
    if args.model == "e2u":
        model_args = dict(args.model_args or {})
        method = str(model_args.get("method", "none"))
        sort_model_args(get_method(method), method, model_args)  # names only: no weights, no data


@pytest.mark.parametrize("where,command,fails", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_fenced_command_parses(where, command, fails):
    argv = shlex.split(command)
    check = _check_e2u if argv[0] == "e2u" else _check_lm_eval
    if fails:
        with pytest.raises((SystemExit, E2UError, AssertionError)):
            check(argv[1:])
        return
    try:
        check(argv[1:])
    except SystemExit as exc:  # argparse's way of rejecting a command line
        pytest.fail(f"{where}: the parser rejects `{command}` (exit {exc.code})")


def test_benchmark_outputs_are_rendered_when_present(tmp_path):
    assert "No benchmark output file" in docs.benchmarks_block(tmp_path)
    out = tmp_path / docs.BENCHMARK_DIR
    out.mkdir(parents=True)
    (out / "edit_speed.json").write_text('[{"method": "memit", "edit_s": 49.0}]', encoding="utf-8")
    block = docs.benchmarks_block(tmp_path)
    assert "| method | edit_s |" in block and "| memit | 49.0 |" in block


def test_a_benchmark_output_of_named_tables_renders_one_table_each(tmp_path):
    out = tmp_path / docs.BENCHMARK_DIR
    out.mkdir(parents=True)
    figures = {"summary": [{"wall_ratio": 1.5, "identical_answers": True}],
               "runs": [{"run": "old", "wall_s": 3.0}, {"run": "new", "wall_s": 2.0}]}
    (out / "command_speed.json").write_text(json.dumps(figures), encoding="utf-8")
    block = docs.benchmarks_block(tmp_path)
    assert "summary:\n\n| wall_ratio | identical_answers |\n|---|---|\n| 1.5 | true |" in block
    assert "runs:\n\n| run | wall_s |\n|---|---|\n| old | 3.0 |\n| new | 2.0 |" in block


def test_the_docs_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, e2u_experiments.docs, e2u_experiments.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_gpu_check_output_is_rendered_and_a_cpu_run_is_refused(tmp_path):
    assert "No GPU check output" in docs.gpu_check_block(tmp_path)
    out = tmp_path / docs.GPU_CHECK_DIR
    out.mkdir(parents=True)
    figures = {"cuda": "Some GPU", "torch": "2.x", "transformers": "5.x", "lm_eval": "0.4.13", "tolerance": 0.02,
               "parity": {"llama/rome": {"cpu_float32": {"finite": True, "unreached": 1, "edit_moved_logits_by": 0.5},
                                         "cuda_float32": {"finite": True, "unreached": 1,
                                                          "max_abs_logit_difference": 2e-6,
                                                          "within_tolerance": True},
                                         "cuda_bfloat16": {"finite": False, "unreached": 2}}},
               "cost": {"requests": 40, "config": {"hidden_size": 4096}, "dtype": "bfloat16",
                        "memit_40_edits": {"seconds": 32.12, "peak_gpu_gib": 38.89, "unreached": 3,
                                           "v_star_seconds": 9.51}}}
    (out / "gpu_check_x.json").write_text(json.dumps(figures), encoding="utf-8")
    block = docs.gpu_check_block(tmp_path)
    assert "| llama/rome | 0.500 | 2.0e-06 | yes | **no** | 1 / 2 |" in block
    assert "| MEMIT (v* included) | 32.1 | 38.9 | 3 of 40 unreached; v* 9.5 s |" in block
    assert "compares no reached edit" not in block  # the CPU reached two of three
    figures["cuda"] = None
    (out / "gpu_check_x.json").write_text(json.dumps(figures), encoding="utf-8")
    with pytest.raises(E2UError, match="ran without a GPU"):
        docs.gpu_check_block(tmp_path)
