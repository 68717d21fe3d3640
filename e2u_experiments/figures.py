"""The paper's figures as PNG (matplotlib, optional: ``pip install e2u[report]``).

- Fig. 3 left: composite score per method, with its 95% interval;
- Fig. 3 right: radar over forget / rephrase / retain x ROUGE-1 / MRR, every axis oriented so that
  larger is better (forget and rephrase as 1 - value);
- Fig. 4: composite vs number of forget samples, one line per method (needs >= 2 forget sizes);
- Fig. 6 right: composite and forget/retain ROUGE-1 vs query-merge size n (methods run with
  >= 2 merge values; no ``merge`` option = n 1);
- recovery: forget ROUGE-1 per method without and after each recovery attack (results with
  ``attack=`` runs).
"""

from __future__ import annotations

import importlib.util
import math
from collections import defaultdict
from pathlib import Path

RADAR_AXES = (("forget", "rouge1_recall", True), ("forget", "mrr", True),
              ("rephrase", "rouge1_recall", True), ("rephrase", "mrr", True),
              ("retain", "rouge1_recall", False), ("retain", "mrr", False))
AXIS_NAMES = {"rouge1_recall": "R1", "mrr": "MRR"}
DPI = 110


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _errors(estimates):
    low = [e.value - e.low if e.low is not None else 0.0 for e in estimates]
    high = [e.high - e.value if e.high is not None else 0.0 for e in estimates]
    return [low, high]


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path.name


def composite_bars(block, path: Path) -> str | None:
    rows = [(r.label, r.composite()) for r in block.rows]
    rows = [(label, e) for label, e in rows if e is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(rows), 3.4))
    values = [e.value for _, e in rows]
    colors = ["#9e9e9e" if label == "none" else "#3b75af" for label, _ in rows]
    ax.bar(range(len(rows)), values, yerr=_errors([e for _, e in rows]), capsize=3, color=colors)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("composite  1 − R1@forget + R1@retain")
    ax.set_ylim(0, max(max(values) * 1.25, 1.2))
    ax.set_title(f"Composite score (95% CI)\n{block.title}", fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    return _save(fig, path)


def radar(block, path: Path) -> str | None:
    plt = _pyplot()
    series = []
    for row in block.rows:
        values = []
        for split, metric, invert in RADAR_AXES:
            e = row.metric(split, metric)
            values.append(None if e is None else (1.0 - e.value if invert else e.value))
        if all(v is not None for v in values):
            series.append((row.label, values))
    if not series:
        return None
    labels = [f"{'1−' if inv else ''}{AXIS_NAMES[m]} {s}" for s, m, inv in RADAR_AXES]
    angles = [2 * math.pi * i / len(labels) for i in range(len(labels))]
    fig = plt.figure(figsize=(5.6, 5.4))
    ax = fig.add_subplot(polar=True)
    ax.set_rlabel_position(75)
    ax.tick_params(axis="y", labelsize=6)
    for number, (label, values) in enumerate(series):
        # tab10 repeats after ten methods: the next ten get the same colours, dashed
        style = {"color": f"C{number % 10}", "linestyle": "-" if number < 10 else "--"}
        ax.plot(angles + angles[:1], values + values[:1], linewidth=1.4, label=label, **style)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.06, color=style["color"])
    ax.set_xticks(angles, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"Forget / rephrase / retain (larger = better)\n{block.title}", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=7)
    return _save(fig, path)


def forget_size_points(blocks, model: str, dataset: str) -> tuple[object, dict[str, list]]:
    """(forget seed, label -> [(forget size, composite)]) for Fig. 4: one point per size, all of
    one forget seed (the one run at the most sizes, the smallest of a tie: other seeds draw
    other forget sets), for every label present at >= 2 sizes."""
    sizes: dict = defaultdict(set)
    chosen = [b for b in blocks if b.model == model and str(b.dataset) == str(dataset)
              and b.limit is None and b.forget_size is not None]
    for block in chosen:
        sizes[block.forget_seed].add(block.forget_size)
    if not sizes:
        return None, {}
    seed = min(sizes, key=lambda s: (-len(sizes[s]), str(s)))
    points: dict[str, list] = defaultdict(list)
    for block in chosen:
        if block.forget_seed != seed:
            continue
        for row in block.rows:
            e = row.composite()
            if e is not None:
                points[row.label].append((block.forget_size, e))
    return seed, {k: sorted(v, key=lambda p: p[0]) for k, v in points.items() if len({s for s, _ in v}) >= 2}


def forget_size_curve(blocks, path: Path, model: str, dataset: str) -> str | None:
    """Composite vs forget size for every method label present at >= 2 sizes."""
    seed, points = forget_size_points(blocks, model, dataset)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, pts in sorted(points.items()):
        ax.errorbar([s for s, _ in pts], [e.value for _, e in pts], yerr=_errors([e for _, e in pts]),
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("number of forget samples")
    ax.set_ylabel("composite (95% CI)")
    ax.set_title(f"Composite vs forget-set size\n{Path(model).name}, {dataset}, forget seed {seed}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def merge_curve(block, path: Path) -> str | None:
    """Composite and forget/retain R1 vs merge size for methods run with >= 2 merge sizes."""
    curves: dict[str, list] = defaultdict(list)
    for row in block.rows:
        others = {k: v for k, v in row.options.items() if k != "merge"}
        if others:
            continue
        try:
            n = int(row.options.get("merge", 1))
        except ValueError:
            continue
        curves[row.method].append((n, row))
    curves = {m: sorted(v, key=lambda p: p[0]) for m, v in curves.items() if len(v) >= 2}
    if not curves:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.4))
    fig.subplots_adjust(wspace=0.32)
    for number, (method, pts) in enumerate(sorted(curves.items())):
        color = f"C{number}"  # one colour per method; forget dashed, retain solid
        ns = [n for n, _ in pts]
        comp = [r.composite() for _, r in pts]
        if all(c is not None for c in comp):
            left.errorbar(ns, [c.value for c in comp], yerr=_errors(comp), marker="o", capsize=3,
                          color=color, label=method)
        for split, style in (("forget", "--"), ("retain", "-")):
            vals = [r.metric(split, "rouge1_recall") for _, r in pts]
            if all(v is not None for v in vals):
                right.errorbar(ns, [v.value for v in vals], yerr=_errors(vals), marker="o", capsize=3,
                               color=color, linestyle=style, label=f"{method} {split}")
    for ax in (left, right):
        ax.set_xlabel("questions merged per edit (n)")
        ax.set_xticks(sorted({n for pts in curves.values() for n, _ in pts}))
        ax.legend(fontsize=7)
    left.set_ylabel("composite (95% CI)")
    right.set_ylabel("ROUGE-1 recall")
    fig.suptitle(f"Query merging: {block.title}", fontsize=9)
    return _save(fig, path)


def recovery_bars(block, path: Path) -> str | None:
    """Grouped bars: per method, forget ROUGE-1 without an attack and after each attack."""
    from e2u_experiments.recovery import recovery_rows

    rows, attacks = recovery_rows(block)
    if not rows:
        return None
    plt = _pyplot()
    series = ["no attack", *attacks]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows) * len(series) / 2, 3.6))
    for number, name in enumerate(series):
        estimates = [(r.base if name == "no attack" else r.attacked.get(name)) for r in rows]
        estimates = [None if row is None else row.metric("forget", "rouge1_recall") for row in estimates]
        xs = [i + (number - (len(series) - 1) / 2) * width for i, e in enumerate(estimates) if e is not None]
        shown = [e for e in estimates if e is not None]
        if shown:
            ax.bar(xs, [e.value for e in shown], width, yerr=_errors(shown), capsize=2, label=name,
                   color=f"C{number % 10}")
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("forget ROUGE-1 (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Recovery attacks: forget ROUGE-1\n{block.title}", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, path)


def write_figures(blocks, out_dir: Path, log=print) -> dict[str, list[str]]:
    """All figures; returns file names per block slug ("" = figures across blocks)."""
    files: dict[str, list[str]] = defaultdict(list)
    for block in blocks:
        for prefix, draw in (("fig3_composite", composite_bars), ("fig3_radar", radar),
                             ("fig6_merge", merge_curve), ("recovery", recovery_bars)):
            name = draw(block, out_dir / f"{prefix}_{block.slug}.png")
            if name:
                files[block.slug].append(name)
    for model, dataset in sorted({(b.model, str(b.dataset)) for b in blocks}):
        name = forget_size_curve(blocks, out_dir / f"fig4_forget_size_{Path(model).name}_{dataset}.png",
                                 model, dataset)
        if name:
            files[""].append(name)
        else:
            log(f"e2u: Fig. 4 (composite vs forget size) for {Path(model).name}/{dataset} needs runs "
                "at two or more forget sizes; skipped")
    return dict(files)
