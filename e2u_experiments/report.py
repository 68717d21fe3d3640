"""``e2u report <results dir> --out <dir>``: the paper's tables and figures from lm-eval results.

Writes ``report.md`` (every table, the figures inline, the run cards, how the intervals were
computed), ``table1.csv`` (forget and retain x ROUGE-1 / prob / MRR / hit, composite),
``table2.csv`` (rephrased forget set and its increase over the plain forget set),
``refusal.csv`` (refusal quality of the answers: refusal rate, entity mention, answer leak),
``utility.csv`` (other benchmarks in the same results, such as ``mmlu`` or ``e2u_general_mc``:
headline metric and change against ``none``),
``recovery.csv`` (forget ROUGE-1 before and after each recovery attack, and the logit lens's
``lens_hit@k``, when the results hold ``attack=`` runs; see :mod:`recovery`),
``seeds.csv`` (where runs of one model, dataset and forget size were drawn at several forget
seeds: mean ± sd over the seeds next to each seed's own interval, and retain relative to
``none``), ``runcards.csv``, ``case_study.md`` (answers before / after, Fig. 5) and, with matplotlib
(``pip install e2u[report]``), the PNG figures: composite bars and forget/retain/rephrase radar
(Fig. 3), composite vs number of forget samples (Fig. 4), query merging (Fig. 6 right), forget
ROUGE-1 before and after the recovery attacks.

Runs are grouped into *blocks* (model, dataset, forget size, forget seed, limit); a table row is a
method with its options; several seeds of one row are averaged (see :mod:`estimates`). Blocks that
differ only in their forget seed are pooled once more ("across forget seeds"), because a number
measured on one forget set says little about the next one.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from e2u_experiments import estimates as est
from e2u_experiments.recovery import recovery_csv, recovery_markdown
from e2u_experiments.runs import METRICS, REFUSAL_METRICS, TIMESTAMP, Run, load_runs
from e2u_tasks.errors import E2UError

METRIC_TITLES = {"rouge1_recall": "ROUGE-1", "prob": "Prob", "mrr": "MRR", "hit_rate": "Hit",
                 "refusal_rate": "refusal", "entity_mention": "entity", "answer_leak": "leak"}
# The refusal-quality table: ROUGE-1 of the three splits, how the answers refuse, and how often
# retain questions are refused (over-refusal).
REFUSAL_COLUMNS = ([(split, "rouge1_recall") for split in ("forget", "rephrase", "retain")]
                   + [(split, m) for split in ("forget", "rephrase") for m in REFUSAL_METRICS]
                   + [("retain", "refusal_rate")])


@dataclass
class Row:
    """One table row: a method (with options) in a block, one run per seed."""

    label: str
    method: str
    options: dict[str, str]
    runs: list[Run]
    boots: list[est.RunBootstrap] = field(default_factory=list)

    def metric(self, split: str, metric: str) -> est.Estimate | None:
        return est.split_metric(self.runs, self.boots, split, metric)

    def composite(self) -> est.Estimate | None:
        return est.composite(self.runs, self.boots)

    def increase(self, metric: str) -> est.Estimate | None:
        return est.rephrase_increase(self.runs, self.boots, metric)

    @property
    def seeds(self) -> list:
        return sorted({r.seed for r in self.runs}, key=str)


@dataclass
class Block:
    model: str
    dataset: str | None
    forget_size: int | None
    forget_seed: int | None
    limit: object
    rows: list[Row]
    shared_options: dict[str, str] = field(default_factory=dict)
    forget_seeds: tuple = ()  # set on a block pooled across forget seeds

    @property
    def title(self) -> str:
        text = f"{Path(self.model).name}, {self.dataset}, {self.forget_size} forget rows"
        if self.forget_seeds:
            text += ", forget seeds " + ", ".join(map(str, self.forget_seeds))
        elif self.forget_seed not in (None, 0):
            text += f" (forget seed {self.forget_seed})"
        if self.limit is not None:
            text += f", limit {self.limit}"
        if self.shared_options:
            text += ", " + ", ".join(f"{k}={v}" for k, v in sorted(self.shared_options.items()))
        return text

    @property
    def slug(self) -> str:
        parts = [Path(self.model).name, str(self.dataset), f"n{self.forget_size}"]
        if self.forget_seeds:
            parts.append("fs" + "+".join(map(str, self.forget_seeds)))
        elif self.forget_seed not in (None, 0):
            parts.append(f"fs{self.forget_seed}")
        if self.limit is not None:
            parts.append(f"limit{self.limit}")
        return "_".join(p.replace("/", "-") for p in parts)


def method_order(label: str) -> tuple:
    """``none`` first, then methods alphabetically, each plain before its variants."""
    base = label.split(" ")[0]
    return (base != "none", base, label != base, label)


def build_blocks(runs: list[Run], iters: int, seed: int, across_forget_seeds: bool = False) -> list[Block]:
    """Blocks of runs; ``across_forget_seeds`` pools the forget seeds of a model, dataset and
    forget size into one block, kept where two or more forget seeds were run, with the rows run at
    two or more of them."""
    grouped: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        fseed = None if across_forget_seeds else run.forget_seed
        grouped[(run.model, run.dataset, run.forget_size, fseed, json.dumps(run.limit))].append(run)
    blocks = []
    for (model, dataset, size, fseed, limit), members in grouped.items():
        if across_forget_seeds and len(_forget_seeds(members)) < 2:
            continue
        # options every run of the block shares (dtype=float16, ...) describe the block, not a row
        shared = dict(set.intersection(*(set(r.options.items()) for r in members)))
        by_label: dict[str, list[Run]] = defaultdict(list)
        for run in members:
            own = {k: v for k, v in run.options.items() if k not in shared}
            opts = ", ".join(f"{k}={v}" for k, v in sorted(own.items()))
            by_label[f"{run.method} ({opts})" if opts else run.method].append(run)
        rows = []
        for label in sorted(by_label, key=method_order):
            same = sorted(by_label[label], key=lambda r: str(r.seed))
            options = {k: v for k, v in same[0].options.items() if k not in shared}
            if across_forget_seeds and len(_forget_seeds(same)) < 2:
                continue
            rows.append(Row(label, same[0].method, options, same,
                            [est.RunBootstrap(r, iters, seed) for r in same]))
        pooled = tuple(_forget_seeds(members)) if across_forget_seeds else ()
        blocks.append(Block(model, dataset, size, fseed, json.loads(limit), rows, shared, pooled))
    return sorted(blocks, key=lambda b: (b.model, str(b.dataset), b.forget_size or 0, str(b.forget_seed)))


def _forget_seeds(runs: list[Run]) -> list:
    return sorted({r.forget_seed for r in runs}, key=str)


def seed_rows(row: Row) -> list[tuple[object, Row]]:
    """A pooled row's runs, one row per forget seed (same bootstrap replicates as the row's)."""
    return [(fseed, Row(row.label, row.method, row.options,
                        [r for r in row.runs if r.forget_seed == fseed],
                        [b for b in row.boots if b.run.forget_seed == fseed]))
            for fseed in _forget_seeds(row.runs)]


def retain_vs_none(base: Row | None, row: Row) -> est.Estimate | None:
    """Retain ROUGE-1 as a fraction of ``base``'s (``none``) on the same forget seed: the mean ±
    sd of the ratios over the row's forget seeds."""
    if base is None:
        return None
    base_by_seed = dict(seed_rows(base))
    ratios = []
    for fseed, one in seed_rows(row):
        mine = one.metric("retain", "rouge1_recall")
        theirs = base_by_seed[fseed].metric("retain", "rouge1_recall") if fseed in base_by_seed else None
        if mine is not None and theirs is not None and theirs.value > 0:
            ratios.append(mine.value / theirs.value)
    return est.combine(ratios, [], [], None)


def targets_reached(runs: list[Run]) -> str:
    """Edit requests whose refusal target the editor's own check reached after the edit, summed
    over ``runs``; then, where every run recorded it, how many v* reached it before the weight
    update (``v* n``)."""
    cards = [r.card["targets"] for r in runs if r.card.get("targets")]
    if not cards:
        return "–"
    text = f"{sum(c['reached'] for c in cards)}/{sum(c['requests'] for c in cards)}"
    if all("v_star_reached" in c for c in cards):
        text += f" (v* {sum(c['v_star_reached'] for c in cards)})"
    return text


ACROSS_COLUMNS = (("forget", "rouge1_recall"), ("rephrase", "rouge1_recall"), ("retain", "rouge1_recall"))


def across_seeds_markdown(block: Block) -> list[str]:
    """Mean ± sd over forget seeds [interval of the mean], each seed below with its own interval."""
    head = ["method", "forget seeds"] + [f"{split} {METRIC_TITLES[m]}" for split, m in ACROSS_COLUMNS]
    head += ["retain / none", "composite", "targets reached"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = baseline_row(block)
    for row in block.rows:
        seeds = " ".join(str(fseed) for fseed, _ in seed_rows(row))
        lines.append(_across_line([f"**{row.label}**", seeds], base, row))
        for fseed, one in seed_rows(row):
            lines.append(_across_line([f"↳ seed {fseed}", ""], base, one))
    return lines


def _across_line(first: list[str], base: Row | None, row: Row) -> str:
    cells = first + [_cell(row.metric(split, m)) for split, m in ACROSS_COLUMNS]
    cells += [_cell(retain_vs_none(base, row)), _cell(row.composite()), targets_reached(row.runs)]
    return "| " + " | ".join(cells) + " |"


def across_seeds_csv_rows(block: Block) -> list[dict]:
    """``seeds.csv``: per method the pooled row (``forget_seed`` lists the seeds), then each seed."""
    rows, base = [], baseline_row(block)
    for row in block.rows:
        for fseed, one in [(" ".join(str(f) for f, _ in seed_rows(row)), row)] + seed_rows(row):
            line = {**_block_columns(block, one), "forget_seed": fseed}
            for split, m in ACROSS_COLUMNS:
                line.update(_estimate_columns(f"{split}_{m}", one.metric(split, m)))
            line.update(_estimate_columns("retain_vs_none", retain_vs_none(base, one)))
            line.update(_estimate_columns("composite", one.composite()))
            line["targets_reached"] = targets_reached(one.runs)
            rows.append(line)
    return rows


def _cell(estimate: est.Estimate | None, signed: bool = False) -> str:
    return "–" if estimate is None else estimate.cell(signed)


def _seeds_note(row: Row) -> str:
    return f" ({len(row.seeds)} seeds)" if len(row.seeds) > 1 else ""


def table1_markdown(block: Block) -> list[str]:
    head = ["method"] + [f"{split} {METRIC_TITLES[m]}" for split in ("forget", "retain") for m in METRICS]
    lines = ["| " + " | ".join(head + ["composite"]) + " |", "|" + "---|" * (len(head) + 1)]
    for row in block.rows:
        cells = [row.label + _seeds_note(row)]
        cells += [_cell(row.metric(split, m)) for split in ("forget", "retain") for m in METRICS]
        cells.append(_cell(row.composite()))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table2_markdown(block: Block) -> list[str]:
    head = ["method"] + [f"rephrase {METRIC_TITLES[m]} (increase over forget)" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in block.rows:
        cells = [row.label + _seeds_note(row)]
        for m in METRICS:
            cells.append(f"{_cell(row.metric('rephrase', m))} ({_cell(row.increase(m), signed=True)})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def refusal_rows(block: Block) -> list[Row]:
    """Rows whose results carry the refusal-quality metrics (results written before they existed
    have none)."""
    return [row for row in block.rows if row.metric("forget", "refusal_rate") is not None]


def refusal_table_markdown(block: Block) -> list[str]:
    head = ["method"] + [f"{split} {METRIC_TITLES[m]}" for split, m in REFUSAL_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in refusal_rows(block):
        cells = [row.label + _seeds_note(row)] + [_cell(row.metric(split, m)) for split, m in REFUSAL_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------ other benchmarks (utility)

def utility_tasks(block: Block) -> list[tuple[str, str]]:
    """(task, headline metric) of every other benchmark in the block's results (``mmlu``,
    ``hellaswag``, ``e2u_general_mc``), in name order."""
    found: dict[str, str] = {}
    for row in block.rows:
        for run in row.runs:
            for task in run.utility_tasks():
                found.setdefault(task, run.headline(task))
    return sorted(found.items())


def baseline_row(block: Block) -> Row | None:
    """The block's ``method=none`` row without options: what a change is measured against."""
    return next((row for row in block.rows if row.label == "none"), None)


def utility_change(block: Block, row: Row, task: str, metric: str) -> est.Estimate | None:
    base = baseline_row(block)
    if base is None or base is row:
        return None
    return est.task_change(row.runs, row.boots, base.runs, base.boots, task, metric)


def utility_markdown(block: Block) -> list[str]:
    """Per method: the composite, and each other benchmark's headline metric with its change
    against ``none`` (Δ)."""
    tasks = utility_tasks(block)
    head = ["method", "composite"] + [f"{task} {metric} (Δ vs none)" for task, metric in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = baseline_row(block)
    for row in block.rows:
        cells = [row.label + _seeds_note(row), _cell(row.composite())]
        for task, metric in tasks:
            value = _cell(est.task_metric(row.runs, row.boots, task, metric))
            change = "baseline" if row is base else _cell(utility_change(block, row, task, metric), signed=True)
            cells.append(f"{value} ({change})")
        lines.append("| " + " | ".join(cells) + " |")
    if base is None:
        lines += ["", "No `method=none` run in this block, so no change against it."]
    return lines


def utility_csv_rows(block: Block) -> list[dict]:
    """One row per method and other benchmark: its headline metric and change against none."""
    rows = []
    for row in block.rows:
        for task, metric in utility_tasks(block):
            entry = {**_block_columns(block, row), "task": task, "metric": metric}
            entry.update(_estimate_columns("composite", row.composite()))
            entry.update(_estimate_columns("value", est.task_metric(row.runs, row.boots, task, metric)))
            entry.update(_estimate_columns("change_vs_none", utility_change(block, row, task, metric)))
            rows.append(entry)
    return rows


# ------------------------------------------------------------------ PISTOL's ripple split

RIPPLE_SPLITS = ("retain", "retain_adjacent", "retain_far")


def ripple_markdown(block: Block) -> list[str]:
    """Retain ROUGE-1 on all retain rows, on the contracts sharing a party with a forgotten one
    (adjacent) and on the rest (far), each with its change against ``none``: where forgetting one
    contract spills over. Empty for blocks without the split (every dataset but PISTOL)."""
    rows = [row for row in block.rows if row.runs[0].task_for("retain_adjacent")]
    if not rows:
        return []
    base = baseline_row(block)
    head = ["method"] + [f"{split.replace('_', ' ')} ROUGE-1 (Δ vs none)" for split in RIPPLE_SPLITS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label + _seeds_note(row)]
        for split in RIPPLE_SPLITS:
            task = row.runs[0].task_for(split)
            value = _cell(est.task_metric(row.runs, row.boots, task, "rouge1_recall"))
            change = ("baseline" if row is base else "–" if base is None else
                      _cell(est.task_change(row.runs, row.boots, base.runs, base.boots, task, "rouge1_recall"),
                            signed=True))
            cells.append(f"{value} ({change})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _gib(value) -> str:
    return "–" if value is None else f"{value / 2**30:.1f}"


def _card_numbers(run: Run) -> dict:
    card = run.card.get("run_card") or {}
    edit, evaluation = card.get("edit") or {}, card.get("evaluation") or {}
    return {"edit_s": edit.get("seconds", run.card.get("edit_seconds")),
            "eval_s": evaluation.get("seconds"),
            "edit_peak_rss_gib": _gib(edit.get("peak_rss_bytes")),
            "eval_peak_rss_gib": _gib(evaluation.get("peak_rss_bytes")),
            "cuda_peak_gib": _gib(max([p for p in (edit.get("cuda_peak_bytes"), evaluation.get("cuda_peak_bytes"))
                                       if p is not None], default=None)),
            "targets_reached": targets_reached([run]),
            "hparams_sha256": (run.card.get("hparams_sha256") or "")[:12],
            "model_sha256": (run.card.get("model_sha256") or "")[:12],
            "packages": ", ".join(f"{k} {v}" for k, v in (run.card.get("packages") or {}).items() if v),
            "file": str(run.path)}


def runcard_markdown(block: Block) -> list[str]:
    lines = ["| method | seed | edit s | eval s | peak RSS edit / eval GiB | targets reached | hparams sha256 | model sha256 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in block.rows:
        for run in row.runs:
            c = _card_numbers(run)
            lines.append(f"| {row.label} | {run.seed} | {c['edit_s'] if c['edit_s'] is not None else '–'} | "
                         f"{c['eval_s'] if c['eval_s'] is not None else '–'} | "
                         f"{c['edit_peak_rss_gib']} / {c['eval_peak_rss_gib']} | {c['targets_reached']} | "
                         f"`{c['hparams_sha256']}` | `{c['model_sha256']}` |")
    return lines


def _estimate_columns(prefix: str, estimate: est.Estimate | None) -> dict:
    if estimate is None:
        return {prefix: "", f"{prefix}_low": "", f"{prefix}_high": "", f"{prefix}_seed_sd": ""}
    return {prefix: f"{estimate.value:.6f}",
            f"{prefix}_low": "" if estimate.low is None else f"{estimate.low:.6f}",
            f"{prefix}_high": "" if estimate.high is None else f"{estimate.high:.6f}",
            f"{prefix}_seed_sd": "" if estimate.sd is None else f"{estimate.sd:.6f}"}


def _block_columns(block: Block, row: Row) -> dict:
    ci_kinds = {e.kind for e in (row.metric("forget", "rouge1_recall"), row.composite()) if e}
    return {"model": block.model, "dataset": block.dataset, "forget_size": block.forget_size,
            "forget_seed": block.forget_seed, "limit": block.limit, "method": row.method,
            "options": json.dumps(row.options, sort_keys=True), "label": row.label,
            "seeds": " ".join(map(str, row.seeds)), "ci": "/".join(sorted(ci_kinds))}


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def rows_are_redistributable(dataset) -> bool:
    """Whether a report may quote the dataset's questions and answers: e2u's own benchmarks and
    the user's files, yes; a benchmark read from its publisher's files at run time (TOFU,
    PISTOL), no: its rows are named by index and a hash of the question instead."""
    from e2u_tasks.data import BENCHMARKS

    benchmark = BENCHMARKS.get(str(dataset))
    return benchmark is None or not benchmark.files


def question_heading(doc: dict, quoted: bool) -> list[str]:
    """The case study's lines naming one question (and its gold answer where it may be quoted)."""
    if quoted:
        return [f"**Q (row {doc.get('index')}):** {doc['question']}  ", f"**gold:** {doc['answer']}", ""]
    digest = hashlib.sha256(str(doc["question"]).encode("utf-8")).hexdigest()[:12]
    return [f"**Q (row {doc.get('index')}, question sha256 {digest}…)**: text and gold answer in the "
            "dataset, read at run time", ""]


def case_study_markdown(blocks: list[Block], questions: int) -> list[str]:
    """Answers of every method next to the un-edited model's, for a few forget (and retain) rows."""
    lines = ["# Case study: answers before and after (Fig. 5)", ""]
    for block in blocks:
        quoted = rows_are_redistributable(block.dataset)
        # (a leaderboard's entries carry per-document scores, not the questions and answers)
        rows = [r for r in block.rows if any("question" in docs[0] for run in r.runs
                                             for docs in run.samples.values() if docs)]
        if not rows:
            continue
        lines += [f"## {block.title}", ""]
        for split, count in (("forget", questions), ("rephrase", max(1, questions // 3)),
                             ("retain", max(1, questions // 3))):
            docs: dict[int, dict] = {}
            answers: dict[str, dict[int, str]] = {}
            for row in rows:
                run = row.runs[0]  # first seed
                for doc in run.samples.get(run.task_for(split) or "", []):
                    docs.setdefault(doc["doc_id"], doc)
                    answers.setdefault(row.label, {})[doc["doc_id"]] = doc.get("generation") or ""
            if not docs:
                continue
            lines += [f"### {split} questions", ""]
            for doc_id in sorted(docs)[:count]:
                doc = docs[doc_id]
                lines += question_heading(doc, quoted)
                lines += ["| method | answer |", "|---|---|"]
                for row in rows:
                    text = answers.get(row.label, {}).get(doc_id)
                    if text is not None:
                        shown = " ".join(text.split()).replace("|", "\\|") or "*(empty)*"
                        lines.append(f"| {row.label} | {shown} |")
                lines.append("")
    if len(lines) == 2:
        lines.append("No answers in these results: run lm-eval with `--log_samples` (a leaderboard keeps "
                     "per-document scores, not the answers).")
    return lines


def load_sources(sources: list[str], log=print) -> list[Run]:
    """Runs of results folders (or files) and of leaderboards (a YAML/JSON file that is no
    ``results_*.json``); a folder's run replaces a board's entry of the same identity, since it
    has the answers too."""
    boards = [s for s in sources if Path(s).is_file() and not TIMESTAMP.search(Path(s).name)]
    folders = [s for s in sources if s not in boards]
    runs = load_runs(folders, log=log) if folders else []
    if boards:
        from e2u_experiments.leaderboard import runs_of_leaderboard  # it imports this module

        have = {json.dumps(r.identity(), sort_keys=True, default=str) for r in runs}
        from_boards = [r for board in boards for r in runs_of_leaderboard(board)]
        kept = [r for r in from_boards if json.dumps(r.identity(), sort_keys=True, default=str) not in have]
        if len(kept) < len(from_boards):
            log(f"e2u: {len(from_boards) - len(kept)} leaderboard entries are runs of the results "
                "folders too; the folders' runs are used")
        runs += kept
    return runs


def of_datasets(runs: list[Run], datasets: list[str] | None) -> list[Run]:
    """The runs on the named datasets (all runs when none is named): one report per benchmark
    from folders and leaderboards that hold several."""
    if not datasets:
        return runs
    present = sorted({str(r.dataset) for r in runs})
    unknown = [d for d in datasets if d not in present]
    if unknown:
        raise E2UError(f"--dataset {unknown[0]!r} matches no run; the runs are on: {', '.join(present)}")
    return [r for r in runs if str(r.dataset) in datasets]


def of_forget_seeds(runs: list[Run], forget_seeds: list[int] | None) -> list[Run]:
    """The runs whose forget set was drawn with one of these seeds (all runs when none is named;
    a run that records none drew with the default, 0): one seed's table from a board of several."""
    if not forget_seeds:
        return runs
    def drawn_with(run):
        return 0 if run.forget_seed is None else run.forget_seed
    present = sorted({drawn_with(r) for r in runs})
    unknown = [s for s in forget_seeds if s not in present]
    if unknown:
        raise E2UError(f"--forget-seed {unknown[0]} matches no run; the runs drew their forget sets with "
                       f"seeds {', '.join(map(str, present))}")
    return [r for r in runs if drawn_with(r) in forget_seeds]


def write_report(folders: list[str], out: str, bootstrap: int = 1000, seed: int = 0,
                 case_study: int = 6, figures: bool = True, log=print,
                 datasets: list[str] | None = None, forget_seeds: list[int] | None = None) -> Path:
    if bootstrap < 100:
        raise E2UError(f"--bootstrap {bootstrap} is too few resamples for a 95% interval; use >= 100")
    runs = of_forget_seeds(of_datasets(load_sources(folders, log), datasets), forget_seeds)
    blocks = build_blocks(runs, bootstrap, seed)
    pooled = build_blocks(runs, bootstrap, seed, across_forget_seeds=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure_files: dict[str, list[str]] = {}
    if figures:
        from e2u_experiments import figures as fig

        if fig.available():
            figure_files = fig.write_figures(blocks, out_dir, log=log)
        else:
            log("e2u: figures need matplotlib: pip install e2u[report] (tables written without them)")
    samples = sum(1 for r in runs if r.samples)
    md = ["# e2u report", "",
          f"{len(runs)} runs from {', '.join(map(str, folders))}. Cells: value [95% interval]; "
          f"intervals are bootstrap percentile intervals over documents ({bootstrap} resamples, "
          f"seed {seed}) for the {samples} runs with per-document samples; `≈` marks a normal "
          "interval from lm-eval's standard error (no `--log_samples`). With several seeds: "
          "mean ± standard deviation across seeds. Forget/rephrase: lower is better; retain and "
          "composite (1 − R1@forget + R1@retain): higher is better.", ""]
    seeds_csv = []
    for block in pooled:
        md += [f"## Across forget seeds: {block.title}", "",
               "Seed s draws the forget set (`forget_seed` s) and seeds the method. Bold rows: mean ± sd "
               "over the forget seeds [95% interval of the mean]; the rows below give each seed with its "
               "own interval. retain / none: retain ROUGE-1 as a fraction of `none`'s on the same forget "
               "seed; targets reached: edit requests whose refusal target the editor's own check reached "
               "after the edit, summed over the seeds, and in brackets how many v* reached before the "
               "weight update (`v* k`, where recorded).", ""]
        md += across_seeds_markdown(block) + [""]
        seeds_csv += across_seeds_csv_rows(block)
    t1_rows, t2_rows, refusal_csv, card_rows, utility_csv, recovery_rows = [], [], [], [], [], []
    for block in blocks:
        md += [f"## {block.title}", "", "### Table 1: forget and retain sets", ""]
        md += table1_markdown(block) + ["", "### Table 2: rephrased forget set (increase over the plain forget set)", ""]
        md += table2_markdown(block) + [""]
        with_refusal = refusal_rows(block)
        if with_refusal:
            md += ["### Refusal quality: how the answers refuse (refusal: says it does not know; "
                   "entity: names the question's key entity; leak: contains the gold answer)", ""]
            md += refusal_table_markdown(block) + [""]
        if utility_tasks(block):
            md += ["### Utility: other benchmarks in the same results (headline metric: acc_norm, "
                   "else acc, else the first; Δ: change against `none`, paired over documents with "
                   "--log_samples, else ≈ from both standard errors)", ""]
            md += utility_markdown(block) + [""]
            utility_csv += utility_csv_rows(block)
        ripple = ripple_markdown(block)
        if ripple:
            md += ["### Ripple: retain ROUGE-1 on contracts that share a party with a forgotten one "
                   "(adjacent) and on the rest (far); Δ: change against `none`, paired over documents", ""]
            md += ripple + [""]
        recovery = recovery_markdown(block, _cell)
        if recovery:
            md += ["### Recovery: forget ROUGE-1 after each attack (change against no attack on the "
                   "same forget rows; relearn on half the forget rows evaluates the other half), and "
                   "the logit lens (share of forget answers readable within the top k at some layer)", ""]
            md += recovery + [""]
            recovery_rows += recovery_csv(block, _block_columns)
        for name in figure_files.get(block.slug, []):
            md += [f"![{name}]({name})", ""]
        md += ["### Run cards", ""] + runcard_markdown(block) + [""]
        for row in block.rows:
            base = _block_columns(block, row)
            t1 = dict(base)
            for split in ("forget", "retain"):
                for m in METRICS:
                    t1.update(_estimate_columns(f"{split}_{m}", row.metric(split, m)))
            t1.update(_estimate_columns("composite", row.composite()))
            t1_rows.append(t1)
            t2 = dict(base)
            for m in METRICS:
                t2.update(_estimate_columns(f"rephrase_{m}", row.metric("rephrase", m)))
                t2.update(_estimate_columns(f"rephrase_{m}_increase", row.increase(m)))
            t2_rows.append(t2)
            if row in with_refusal:
                refusal = dict(base)
                for split, m in REFUSAL_COLUMNS:
                    refusal.update(_estimate_columns(f"{split}_{m}", row.metric(split, m)))
                refusal_csv.append(refusal)
            for run in row.runs:
                card_rows.append({**base, "seed": run.seed, **_card_numbers(run)})
    for name in figure_files.get("", []):
        md += [f"![{name}]({name})", ""]
    md += ["Case study (answers before/after): [case_study.md](case_study.md)", ""]
    (out_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out_dir / "case_study.md").write_text("\n".join(case_study_markdown(blocks, case_study)), encoding="utf-8")
    _write_csv(out_dir / "table1.csv", t1_rows)
    _write_csv(out_dir / "table2.csv", t2_rows)
    _write_csv(out_dir / "seeds.csv", seeds_csv)
    _write_csv(out_dir / "refusal.csv", refusal_csv)
    _write_csv(out_dir / "utility.csv", utility_csv)
    _write_csv(out_dir / "recovery.csv", recovery_rows)
    _write_csv(out_dir / "runcards.csv", card_rows)
    (out_dir / "bootstrap.json").write_text(json.dumps(
        {"iters": bootstrap, "seed": seed, "level": est.LEVEL, "method": "percentile, documents "
         "resampled with replacement per split; composite: forget and retain independently; "
         "rephrase increase: forget/rephrase pairs"}, indent=1), encoding="utf-8")
    log(f"e2u: report of {len(runs)} runs in {len(blocks)} block(s) written to {out_dir}")
    return out_dir
