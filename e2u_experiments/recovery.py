"""The report's recovery table: is the forgotten knowledge gone, or only hidden?

Per method (with its options other than the attack's), the forget ROUGE-1 without an attack,
after each attack found in the results (``attack=quantize`` / ``relearn`` runs: the ``attack*``
model args), and the logit lens's ``lens_hit@k`` on the forget set without an attack (the share
of forget questions whose answer's first token ranks within the top k at some layer).

An attack's change is against the same method without attack *on the same forget rows*:
``attack=relearn`` with ``attack_data=forget_half`` evaluates only the held-out half, so its
baseline is the un-attacked run's mean over those rows, from the per-document samples
(``--log_samples``); without samples that change is not shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e2u_experiments.runs import LENS_PREFIX

ATTACK_PREFIX = "attack"


def attack_label(options: dict[str, str]) -> str | None:
    """``attack=quantize, attack_bits=4`` for a row run under an attack, else None."""
    parts = [f"{k}={v}" for k, v in sorted(options.items()) if k.startswith(ATTACK_PREFIX)]
    return ", ".join(parts) or None


def _without_attack(options: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in options.items() if not k.startswith(ATTACK_PREFIX)}


@dataclass
class RecoveryRow:
    """One method (label without the attack's options), its plain row and its attacked rows."""

    label: str
    base: object | None  # report.Row
    attacked: dict[str, object] = field(default_factory=dict)  # attack label -> report.Row


def recovery_rows(block) -> tuple[list[RecoveryRow], list[str]]:
    """The methods of ``block`` with at least one attacked run, and the attacks' labels."""
    by_method: dict[str, RecoveryRow] = {}
    attacks: list[str] = []
    for row in block.rows:
        options = {**block.shared_options, **row.options}
        plain = _without_attack(options)
        key = row.method + repr(sorted(plain.items()))
        label = ", ".join(f"{k}={v}" for k, v in sorted(_without_attack(row.options).items()))
        entry = by_method.setdefault(key, RecoveryRow(f"{row.method} ({label})" if label else row.method, None))
        attack = attack_label(options)
        if attack is None:
            entry.base = row
        else:
            entry.attacked[attack] = row
            if attack not in attacks:
                attacks.append(attack)
    return [r for r in by_method.values() if r.attacked], sorted(attacks)


def lens_hit_metric(row) -> str | None:
    """The ``lens_hit@<k>`` metric name of a row's forget task, if its results have one."""
    for run in row.runs:
        names = run.metrics.get(run.task_for("forget") or "", {})
        for name in sorted(names):
            if name.startswith(f"{LENS_PREFIX}hit@") and not name.endswith("_stderr"):
                return name
    return None


def baseline_on_same_rows(base, attacked) -> float | None:
    """Forget ROUGE-1 of ``base`` on the rows each attacked run evaluated, averaged over seeds."""
    if base is None:
        return None
    values = []
    for run in attacked.runs:
        match = next((b for b in base.runs if b.seed == run.seed), base.runs[0])
        held_out = run.card.get("evaluated_forget_row_indices")
        if held_out is None:
            value = match.split_value("forget", "rouge1_recall")
        else:
            docs = match.samples.get(match.task_for("forget") or "", [])
            by_row = {d.get("index"): d.get("rouge1_recall") for d in docs}
            if any(by_row.get(i) is None for i in held_out):
                return None
            value = sum(by_row[i] for i in held_out) / len(held_out)
        if value is None:
            return None
        values.append(value)
    return sum(values) / len(values) if values else None


def _value(row, split: str, metric: str):
    return None if row is None else row.metric(split, metric)


def recovery_markdown(block, cell) -> list[str]:
    """The table (``cell`` formats an estimate); empty when the block has no attacked run."""
    rows, attacks = recovery_rows(block)
    if not rows:
        return []
    lens = next((m for r in rows for m in [lens_hit_metric(r.base)] if r.base is not None and m), None)
    head = ["method", "forget R1, no attack"] + ([f"forget {lens}, no attack"] if lens else [])
    head += [f"forget R1 after {a} (change)" for a in attacks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in rows:
        cells = [entry.label, cell(_value(entry.base, "forget", "rouge1_recall"))]
        if lens:
            cells.append(cell(_value(entry.base, "forget", lens)))
        for attack in attacks:
            row = entry.attacked.get(attack)
            after = _value(row, "forget", "rouge1_recall")
            before = baseline_on_same_rows(entry.base, row) if row is not None else None
            change = f" ({after.value - before:+.3f})" if after is not None and before is not None else ""
            cells.append(cell(after) + change)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recovery_csv(block, base_columns) -> list[dict]:
    """One CSV row per method and attack (``base_columns(block, row)``: the report's columns)."""
    out = []
    rows, _ = recovery_rows(block)
    for entry in rows:
        for attack, row in entry.attacked.items():
            after = _value(row, "forget", "rouge1_recall")
            plain = _value(entry.base, "forget", "rouge1_recall")
            before = baseline_on_same_rows(entry.base, row)
            lens = lens_hit_metric(entry.base) if entry.base is not None else None
            lens_value = _value(entry.base, "forget", lens) if lens else None
            out.append({**base_columns(block, row), "attack": attack,
                        "forget_rouge1_no_attack": "" if plain is None else f"{plain.value:.6f}",
                        "forget_rouge1_no_attack_same_rows": "" if before is None else f"{before:.6f}",
                        "forget_rouge1_after": "" if after is None else f"{after.value:.6f}",
                        "lens_metric": lens or "",
                        "forget_lens_no_attack": "" if lens_value is None else f"{lens_value.value:.6f}"})
    return out
