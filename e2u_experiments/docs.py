"""``e2u docs``: regenerate the generated blocks of README.md and docs/*.md.

A generated block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``;
everything between the markers is replaced by what :func:`generate_blocks` produces, from the
code (method registry, model args, hparams dataclasses and YAML presets), the leaderboard
(``leaderboards/smollm2-135m.yaml``) and benchmark output files. The bad-input matrix keeps its
own generator (``python -m tests.test_bad_input_matrix``), which ``e2u docs`` runs when the
tests are present. Nothing here imports torch at module import time.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from e2u_tasks.errors import E2UError

ROOT = Path(__file__).resolve().parents[1]
LEADERBOARD = Path("leaderboards/smollm2-135m.yaml")
BENCHMARK_DIR = Path("benchmarks/results")
BLOCK = re.compile(r"(<!-- generated:([a-z0-9-]+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.S)

# One sentence per model arg; a new arg without a line here is an error of `e2u docs`.
MODEL_ARG_HELP = {
    "pretrained": "hub id, local folder (also one written by `save_edited`), or the embedded alias",
    "method": "the method applied to the forget split before evaluation (the methods table of the README)",
    "hparams": "a preset name (e.g. `smollm2-135m`) or a YAML file; default: the preset matching "
               "the model's config, else the method's YAML",
    "seed": "seed of the method and of the `idk` refusal draw (recorded)",
    "cache_dir": "caches: embedded model, statistics, edits, fine-tuned models "
                 "(default `$E2U_CACHE_DIR`, else `~/.cache/e2u`)",
    "cache": "reuse and store edits and fine-tuned models in the cache",
    "chat_template": "`auto` (use the model's template if it has one), `true`, `false`",
    "system_prompt": "a system turn (default: the template's own default)",
    "top_m": "the m of `hit_rate`",
    "target": "refusal target: unset = `idk` (one refusal per forget row, seeded), `self` "
              "(written by the model), or a literal sentence",
    "refusal_file": "with `target=idk`: your own refusal set, one sentence a line",
    "targets_file": "JSON Lines with `question` and `target`: one reviewed refusal per forget question",
    "export_targets": "write the targets of this run into a JSON Lines file",
    "finetune": "fine-tune on a whole dataset first (`pistol`, `tofu_factual`, a file)",
    "finetune_hparams": "the fine-tuning recipe: a preset name or a YAML file",
    "finetune_<recipe key>": "one key of the recipe, e.g. `finetune_lr=3e-4`, `finetune_epochs=12`",
    "save_edited": "write the edited model (and GRACE/WISE state) to this folder",
    "dataset": "`tofu_factual`, `pistol`, `known_facts`, a `.json`/`.jsonl` file or a hub file id "
               "`<owner>/<name>/<file>`",
    "forget_size": "rows drawn for the forget set (TOFU, known facts and own data; default 40)",
    "forget_seed": "seed of that draw",
    "forget_edge": "PISTOL contract(s) to forget: `A_B` (default), or several as `A_B+A_C`",
    "forget_indices": "explicit row indices instead: `[3,7,9]` (CLI) or `3;7;9`",
    "known_only": "`true`: forget and retain only rows the unedited model answers correctly "
                  "(ROUGE-1 recall 1.0, both phrasings)",
    "data_dir": "local data mirror laid out as `<dataset id>/<file>` (default `$E2U_DATA_DIR`)",
    "lens": "the logit-lens metrics `lens_mrr`, `lens_hit@k` on every e2u task ([attacks](attacks.md))",
    "lens_k": "the k of `lens_hit@k`",
    "attack": "recovery attack after the method, before evaluation: `quantize` or `relearn` "
              "([attacks](attacks.md))",
    "attack_bits": "`attack=quantize`: 8 or 4 bits (symmetric round-to-nearest)",
    "attack_group_size": "`attack=quantize`: inputs per quantisation group (0 = one per output row)",
    "attack_steps": "`attack=relearn`: optimizer steps (>= 1)",
    "attack_lr": "`attack=relearn`: learning rate",
    "attack_data": "`attack=relearn`: `forget_half` (relearn half the forget rows, evaluate the "
                   "other half) or `retain`",
    "attack_lora": "`attack=relearn`: `true` trains a LoRA adapter (merged) instead of every weight",
}


# --------------------------------------------------------------------------- small helpers


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    return f"`{_cell(value)}`" if value not in (None, "") else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _first_line(module) -> str:
    doc = (module.__doc__ or "").strip().splitlines()
    return doc[0].strip().rstrip(",.").replace("``", "`") if doc else ""


# --------------------------------------------------------------------------- blocks from code


def _retain_use(module) -> str:
    if hasattr(module, "uses_retain"):
        return "optional (`retain_weight` > 0)"
    return "yes" if module.USES_RETAIN else "no"


def methods_block() -> str:
    """The methods table: registry order, NAME / KIND / USES_RETAIN and the docstring's first line."""
    from e2u_models.methods import METHODS, get_method
    from e2u_models.hparams import preset_files

    rows = []
    for name in METHODS:
        module = get_method(name)
        presets = ", ".join(preset_files(name)) or "–"
        rows.append([f"`{module.NAME}`", module.KIND, _retain_use(module), presets,
                     _cell(_first_line(module))])
    return _table(["method", "kind", "uses retain split", "model presets", "what it does"], rows)


def model_args_block() -> str:
    """e2u's own model args with their defaults, then the split args (``SPEC_KEYS``)."""
    from e2u_models.args import DEFAULTS, E2U_ARGS
    from e2u_models.embedded import DEFAULT_MODEL
    from e2u_tasks.splits import SPEC_KEYS

    from e2u_models.attacks.spec import ATTACK_DEFAULTS

    defaults = {"pretrained": DEFAULT_MODEL, **DEFAULTS, **ATTACK_DEFAULTS, "dataset": "tofu_factual",
                "forget_size": 40, "forget_seed": 0, "forget_edge": "A_B",
                "known_only": False}
    missing = [name for name in E2U_ARGS if name not in MODEL_ARG_HELP]
    if missing:
        raise E2UError(f"model arg(s) {', '.join(missing)} have no line in e2u_experiments/docs.py "
                       "MODEL_ARG_HELP; add one")
    rows = []
    for name in E2U_ARGS:
        default = defaults.get(name)
        shown = "–" if default is None else _code(default if not isinstance(default, bool) else str(default).lower())
        rows.append([f"`{name}`", "split" if name in SPEC_KEYS else "e2u", shown, MODEL_ARG_HELP[name]])
    return _table(["model arg", "owner", "default", "meaning"], rows)


def _rule(meta) -> str:
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    if "min" in meta:
        parts.append(f"≥ {meta['min']}")
    if "above" in meta:
        parts.append(f"> {meta['above']}")
    if "range" in meta:
        parts.append(f"in {meta['range']}")
    if meta.get("finite"):
        parts.append("finite")
    return "; ".join(parts)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _yaml_header(path: Path) -> str:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _fields_table(cls: type) -> str:
    from e2u_models.hparams import field_rules

    rules = field_rules(cls)
    rows = [[f"`{f.name}`", _cell(str(f.type)),
             "the [architecture family](architectures.md)'s" if "architecture" in f.metadata else _code(_default(f)),
             _rule(rules.get(f.name, {}))]
            for f in dataclasses.fields(cls)]
    return _table(["hparam", "type", "default", "rule"], rows) if rows else "No hyperparameters."


def _presets_table(method: str) -> str:
    import yaml

    from e2u_models.hparams import PRESET_META_KEYS, hparams_file, preset_files

    rows = []
    own = hparams_file(method)
    if own.is_file():
        values = yaml.safe_load(own.read_text(encoding="utf-8")) or {}
        rows.append([f"`{method}.yaml` (default)", "–",
                     ", ".join(f"`{k}: {_cell(v)}`" for k, v in values.items() if k not in PRESET_META_KEYS),
                     _cell(_yaml_header(own))])
    for name, path in preset_files(method).items():
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        match = ", ".join(f"{k}={v}" for k, v in (values.get("match") or {}).items())
        changes = ", ".join(f"`{k}: {_cell(v)}`" for k, v in values.items() if k not in PRESET_META_KEYS)
        rows.append([f"`{name}` (base `{values.get('base', '–')}`)", _cell(match) or "–", changes or "–",
                     _cell(_yaml_header(path))])
    return _table(["file", "matches config", "sets", "what it is for / tuned on"], rows) if rows else ""


def hparams_block() -> str:
    """Per method: the HyperParams fields (type, default, declared rule) and the YAML files."""
    from e2u_models.methods import METHODS, get_method
    from e2u_models.training.finetune import HPARAMS_NAME, FinetuneHParams

    parts = []
    for name in METHODS:
        parts.append(f"### `{name}`\n\n{_fields_table(get_method(name).HyperParams)}")
        presets = _presets_table(name)
        if presets:
            parts.append(f"Files in `e2u_models/methods/hparams/` (a preset lists only what it changes):\n\n{presets}")
    parts.append(f"### `finetune=` recipe (`finetune_<key>=`)\n\n{_fields_table(FinetuneHParams)}")
    parts.append(f"Files in `e2u_models/methods/hparams/`:\n\n{_presets_table(HPARAMS_NAME)}")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- blocks from the leaderboard


def _load_board(path: Path) -> dict:
    from e2u_experiments.leaderboard import load_leaderboard

    return load_leaderboard(path)


def entry_label(entry: dict) -> str:
    options = entry.get("options") or {}
    extra = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{entry['method']} ({extra})" if extra else entry["method"]


def _value(entry: dict, task: str, metric: str) -> float | None:
    cell = (entry.get("metrics") or {}).get(task, {}).get(metric)
    return None if cell is None else float(cell["value"])


def fmt(value: float | None) -> str:
    """How every leaderboard number is printed in the docs (3 decimals)."""
    return "–" if value is None else f"{value:.3f}"


def _prefix(entry: dict) -> str:
    """The entry's task prefix (``tofu``, ``pistol``, ``facts``, ``e2u``), read from its metrics."""
    forget = sorted(t for t in entry["metrics"] if t.endswith("_forget"))
    return forget[0][: -len("_forget")] if forget else "tofu"


def _group(entry: dict) -> str:
    """The entry's group (``tofu_factual``, ``pistol``, ``known_facts``, ...): the metrics' task
    that is no split and reports the composite (other benchmarks in the entry report none)."""
    from e2u_experiments.runs import split_of

    groups = sorted(t for t, values in entry["metrics"].items()
                    if split_of(t) is None and "composite" in values)
    return groups[0] if groups else "tofu_factual"


def _by_dataset(board: dict) -> dict[str, dict[str, list[dict]]]:
    """Entries grouped by dataset, then by method label, in the board's order."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for e in board["entries"]:
        grouped.setdefault(str(e.get("dataset")), {}).setdefault(entry_label(e), []).append(e)
    return grouped


def _forget_seeds(entries: list[dict]) -> list:
    return sorted({e.get("forget_seed") for e in entries}, key=str)


def _mean_sd(values: list[float | None]) -> str:
    """Mean ± sample standard deviation of the values, as every multi-seed number is printed."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return fmt(values[0] if values else None)
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def _retain_ratios(entries: list[dict], baseline: list[dict]) -> list[float]:
    """Each entry's retain ROUGE-1 over ``none``'s on the same forget seed."""
    base = {e.get("forget_seed"): _value(e, f"{_prefix(e)}_retain", "rouge1_recall") for e in baseline}
    ratios = []
    for e in entries:
        mine, theirs = _value(e, f"{_prefix(e)}_retain", "rouge1_recall"), base.get(e.get("forget_seed"))
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return ratios


def _seeds_table(by_label: dict[str, list[dict]]) -> str:
    """Methods run at two or more forget seeds: mean ± sd over the seeds."""
    rows = []
    baseline = by_label.get("none", [])
    for label, entries in by_label.items():
        seeds = _forget_seeds(entries)
        if len(seeds) < 2:
            continue
        p, group = _prefix(entries[0]), _group(entries[0])
        r1 = {split: _mean_sd([_value(e, f"{p}_{split}", "rouge1_recall") for e in entries])
              for split in ("forget", "retain", "rephrase")}
        rows.append([label, " ".join(map(str, seeds)), r1["forget"], r1["retain"],
                     _mean_sd(_retain_ratios(entries, baseline)), r1["rephrase"],
                     _mean_sd([_value(e, group, "composite") for e in entries])])
    return _table(["method", "seeds", "forget R1", "retain R1", "retain / none", "rephrase R1", "composite"], rows)


def glance_block(board: dict, source: str) -> str:
    """Per dataset of the board: the methods run at several seeds (seed s drawing forget set s) as
    mean ± sd over the seeds; a dataset run at one seed only, every entry's own numbers."""
    parts = [f"From `{source}` ({board.get('name', '')}). ROUGE-1 recall; forget and rephrase ↓, "
             "retain ↑, composite = (1 − forget) + retain ↑."]
    by_dataset = _by_dataset(board)
    for dataset, by_label in by_dataset.items():
        several = any(len(_forget_seeds(entries)) > 1 for entries in by_label.values())
        if len(by_dataset) > 1:
            parts.append(f"**{dataset}**" + (", mean ± sd over seeds (seed s draws forget set s); "
                                            "retain / none: retain as a fraction of `none`'s on "
                                            "the same seed" if several else ""))
        if several:
            parts.append(_seeds_table(by_label))
            continue
        rows = []
        for label, entries in by_label.items():
            for e in entries:
                p, group = _prefix(e), _group(e)
                rows.append([label, fmt(_value(e, f"{p}_forget", "rouge1_recall")),
                             fmt(_value(e, f"{p}_retain", "rouge1_recall")),
                             fmt(_value(e, f"{p}_rephrase", "rouge1_recall")), fmt(_value(e, group, "composite"))])
        parts.append(_table(["method", "forget R1", "retain R1", "rephrase R1", "composite"], rows))
    return "\n\n".join(parts)


def _where_columns(board: dict) -> Callable[[dict], list[str]]:
    """Dataset and forget seed columns, only when the board holds more than one of them."""
    entries = board["entries"]
    datasets = len({str(e.get("dataset")) for e in entries}) > 1
    seeds = len(_forget_seeds(entries)) > 1
    return lambda e: (([str(e.get("dataset"))] if datasets else []) + ([str(e.get("forget_seed"))] if seeds else []))


def _where_header(board: dict) -> list[str]:
    return _where_columns(board)({"dataset": "dataset", "forget_seed": "seed"})


def full_block(board: dict, source: str) -> str:
    rows, where = [], _where_columns(board)
    for e in board["entries"]:
        p = _prefix(e)
        cells = [entry_label(e)] + where(e)
        for split in ("forget", "retain", "rephrase"):
            cells.append(" / ".join(fmt(_value(e, f"{p}_{split}", m))
                                    for m in ("rouge1_recall", "prob", "mrr", "hit_rate")))
        cells.append(fmt(_value(e, _group(e), "composite")))
        rows.append(cells)
    head = f"From `{source}`; each split: ROUGE-1 / prob / MRR / hit@100.\n\n"
    return head + _table(["method"] + _where_header(board) + ["forget", "retain", "rephrase", "composite"], rows)


def refusal_block(board: dict, source: str) -> str:
    rows, where = [], _where_columns(board)
    for e in board["entries"]:
        p = _prefix(e)
        cells = [entry_label(e)] + where(e)
        for split in ("forget", "rephrase"):
            cells += [fmt(_value(e, f"{p}_{split}", m)) for m in ("refusal_rate", "entity_mention", "answer_leak")]
        cells.append(fmt(_value(e, f"{p}_retain", "refusal_rate")))
        rows.append(cells)
    head = (f"From `{source}`. Refusal ↑ on forget/rephrase, entity mention ↑, leak ↓; retain refusal "
            "is over-refusal ↓.\n\n")
    return head + _table(["method"] + _where_header(board) + ["forget refusal", "forget entity", "forget leak", "rephrase refusal",
                          "rephrase entity", "rephrase leak", "retain refusal"], rows)


# --------------------------------------------------------------------------- benchmark outputs


def benchmarks_block(root: Path) -> str:
    folder = root / BENCHMARK_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    how = ("Produce them with `python benchmarks/eval_speed.py --baseline > benchmarks/results/eval_speed.json` "
           "(prints JSON), `python benchmarks/command_speed.py --json benchmarks/results/command_speed.json`, "
           "`python benchmarks/edit_speed.py --json benchmarks/results/edit_speed.json`, "
           "`python benchmarks/editor_speed.py --old-rev <revision> --json benchmarks/results/editor_speed.json`, "
           "`python benchmarks/wise_sensitivity.py [--model smollm2-135m-instruct] --json "
           "benchmarks/results/wise_sensitivity_<name>.json` "
           "and then run `e2u docs`; `python benchmarks/train_speed.py` prints its own Markdown table.")
    if not files:
        return f"No benchmark output file in `{BENCHMARK_DIR}/`. {how}"
    parts = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise E2UError(f"benchmark output {path}: not valid JSON ({exc})") from None
        tables = data if _is_named_tables(data) else {"": data if isinstance(data, list) else [data]}
        rendered = [(f"{name}:\n\n" if name else "") + _rows_table(rows) for name, rows in tables.items()]
        parts.append(f"`{BENCHMARK_DIR}/{path.name}`:\n\n" + "\n\n".join(rendered))
    return "\n\n".join(parts) + f"\n\n{how}"


GPU_CHECK_DIR = BENCHMARK_DIR / "gpu"
# Stages of benchmarks/gpu_check.py's cost part, in its order, with what each one is.
GPU_STAGES = {
    "statistics_pass": "statistics pass (5 layers)",
    "v_star_{n}_requests": "request preparation and v*",
    "memit_{n}_edits": "MEMIT (v* included)",
    "alphaedit_{n}_edits": "AlphaEdit (v* included)",
    "gd_10_lora_steps": "GD, 10 LoRA steps",
    "evaluation": "evaluation (`tofu_factual`)",
    "grace_{n}_edits": "GRACE",
    "wise_{n}_edits": "WISE",
}


def gpu_check_block(root: Path) -> str:
    """What ``benchmarks/gpu_check.py`` measured on a GPU: CPU-vs-CUDA parity and the cost of
    each stage at Llama-2-7B's shape, one section per output file."""
    folder = root / GPU_CHECK_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    how = (f"Produce one with `python benchmarks/gpu_check.py --out {GPU_CHECK_DIR}/gpu_check_<gpu>.json` "
           "on a machine with a GPU, then run `e2u docs`.")
    if not files:
        return f"No GPU check output in `{GPU_CHECK_DIR}/`. {how}"
    return "\n\n".join(_gpu_check_section(path) for path in files) + f"\n\n{how}"


def _gpu_check_section(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise E2UError(f"GPU check output {path}: not valid JSON ({exc})") from None
    if not data.get("cuda"):
        raise E2UError(f"GPU check output {path}: ran without a GPU (its figures only show that the "
                       "script runs); keep GPU runs only in that folder")
    parts = [f"`{GPU_CHECK_DIR}/{path.name}`: {data['cuda']}, torch {data['torch']}, "
             f"transformers {data.get('transformers', '?')}, lm-eval {data.get('lm_eval', '?')}."]
    parity = data.get("parity") or {}
    if parity:
        rows = []
        for pair, runs in parity.items():
            cpu, cuda, bf16 = runs.get("cpu_float32", {}), runs.get("cuda_float32", {}), runs.get("cuda_bfloat16", {})
            rows.append([pair, fmt(cpu.get("edit_moved_logits_by")), _sci(cuda.get("max_abs_logit_difference")),
                         _yes(cuda.get("within_tolerance")), _yes(bf16.get("finite")),
                         _reach(cpu.get("unreached"), bf16.get("unreached"))])
        parts.append(f"Parity (tiny random models, three edits; tolerance {data['tolerance']} of the largest "
                     "logit). *Moved*: how far the edit moved the probe logits on the CPU; *CUDA fp32 "
                     "difference*: the largest logit difference from CPU fp32 after the same edit.\n\n"
                     + _table(["model/method", "moved", "CUDA fp32 difference", "within tolerance",
                               "bf16 finite", "unreached of 3, CPU fp32 / CUDA bf16"], rows))
        reached_on_cpu = [runs["cpu_float32"]["unreached"] < 3 for runs in parity.values()
                          if "unreached" in runs.get("cpu_float32", {})]
        if reached_on_cpu and not any(reached_on_cpu):
            parts.append("The quick settings reach none of the three refusals on the CPU either, so the last "
                         "column compares no reached edit here; the bf16 edits are checked for finite logits only.")
    cost = data.get("cost") or {}
    if cost:
        n = cost.get("requests")
        rows = []
        for key, label in GPU_STAGES.items():
            record = cost.get(key.format(n=n))
            if record is None:
                continue
            notes = {"unreached": f"{record.get('unreached')} of {n} unreached",
                     "v_star_seconds": f"v* {_one(record.get('v_star_seconds'))} s",
                     "documents": f"{record.get('documents')} documents", "tokens": f"{record.get('tokens')} tokens"}
            extra = [text for field_name, text in notes.items() if field_name in record]
            rows.append([label, _one(record.get("seconds")), _one(record.get("peak_gpu_gib")), "; ".join(extra)])
        shape = cost.get("config", {})
        parts.append(f"Cost: random weights with the configuration of Llama-2-7B (hidden {shape.get('hidden_size')}, "
                     f"MLP {shape.get('intermediate_size')}, {shape.get('num_hidden_layers')} layers) in "
                     f"{cost.get('dtype')}, {n} edit requests. Random weights reach no refusal, so every "
                     "value loop runs all its steps: these are upper bounds.\n\n"
                     + _table(["stage", "seconds", "peak GPU memory (GiB)", "notes"], rows))
        if "error" in cost:
            parts.append(f"The cost part stopped: {cost['error']}")
    return "\n\n".join(parts)


def _one(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _sci(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def _yes(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "**no**")


def _reach(cpu: int | None, bf16: int | None) -> str:
    return "" if cpu is None else f"{cpu} / {bf16}"


def _is_named_tables(data: Any) -> bool:
    """A JSON object whose every value is a list of objects (``{"summary": [...], "runs": [...]}``):
    one table per key."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(rows, list) and all(isinstance(row, dict) for row in rows) for rows in data.values())


def _rows_table(rows: list) -> str:
    keys = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    return _table(keys, [[_cell(row.get(k, "")) for k in keys] for row in rows if isinstance(row, dict)])


# --------------------------------------------------------------------------- generation and checking


def generate_blocks(root: Path = ROOT, leaderboard: Path | str | None = None) -> dict[str, str]:
    """Every generated block by name (the bad-input matrix has its own generator)."""
    root = Path(root)
    board_path = Path(leaderboard) if leaderboard else root / LEADERBOARD
    board = _load_board(board_path)
    source = f"{LEADERBOARD.parent}/{board_path.name}"
    makers: dict[str, Callable[[], str]] = {
        "methods": methods_block,
        "model-args": model_args_block,
        "hparams": hparams_block,
        "results-glance": lambda: glance_block(board, source),
        "results-full": lambda: full_block(board, source),
        "refusal-quality": lambda: refusal_block(board, source),
        "benchmarks": lambda: benchmarks_block(root),
        "gpu-check": lambda: gpu_check_block(root),
    }
    return {name: make() for name, make in makers.items()}


def doc_files(root: Path = ROOT) -> list[Path]:
    root = Path(root)
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, blocks: dict[str, str], where: str = "") -> str:
    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in blocks:
            raise E2UError(f"{where}: unknown generated block {name!r}; known: {', '.join(blocks)}")
        return f"{match.group(1)}{blocks[name]}\n{match.group(4)}"

    return BLOCK.sub(replace, text)


def block_names(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def stale_blocks(root: Path = ROOT, blocks: dict[str, str] | None = None,
                 leaderboard: Path | str | None = None) -> list[str]:
    """``file: block`` for every generated block whose text differs from the generator's."""
    blocks = blocks if blocks is not None else generate_blocks(root, leaderboard)
    stale = []
    for path in doc_files(root):
        text = path.read_text(encoding="utf-8")
        current = {m.group(2): m.group(3) for m in BLOCK.finditer(text)}
        for name, body in current.items():
            if name in blocks and body != blocks[name] + "\n":
                stale.append(f"{path.relative_to(root)}: {name}")
            elif name not in blocks:
                stale.append(f"{path.relative_to(root)}: {name} (unknown block)")
    return stale


def write_docs(root: Path = ROOT, leaderboard: Path | str | None = None, check: bool = False,
               bad_input: bool = True, log: Callable[[str], None] = print) -> int:
    """Regenerate (or with ``check`` only report) every generated block; 1 if ``check`` finds any stale."""
    root = Path(root)
    blocks = generate_blocks(root, leaderboard)
    if check:
        stale = stale_blocks(root, blocks)
        for line in stale:
            log(f"e2u docs: stale generated block {line}")
        return 1 if stale else 0
    for path in doc_files(root):
        text = path.read_text(encoding="utf-8")
        new = render(text, blocks, str(path))
        if new != text:
            path.write_text(new, encoding="utf-8")
            log(f"e2u docs: rewrote {', '.join(block_names(text))} in {path.relative_to(root)}")
    if bad_input:
        if (root / "tests" / "test_bad_input_matrix.py").is_file():
            log("e2u docs: regenerating the bad-input matrix (python -m tests.test_bad_input_matrix --write-docs)")
            subprocess.run([sys.executable, "-m", "tests.test_bad_input_matrix", "--write-docs"],
                           cwd=root, check=True)
        else:
            log("e2u docs: tests/ not found; bad-input matrix left as it is")
    return 0
