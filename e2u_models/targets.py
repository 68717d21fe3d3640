"""Refusal targets: what an editing method teaches the model to say instead of the answer.

``target=idk`` (default) draws one refusal per forget row from a refusal set: e2u's own 75
sentences (``e2u_models/data/refusals.txt``) or ``refusal_file=<file>`` (one sentence a line).
The draw is keyed by a hash of (seed, row index), so a row keeps its refusal whatever else is
forgotten. ``target=<a sentence>`` uses one fixed refusal for every row. ``target=self``: the model writes
one refusal per forget question before editing (:mod:`e2u_models.self_targets`).
``targets_file=<file>`` reads per-question refusals from a JSON Lines file (``question`` and
``target`` per line, as ``export_targets=`` writes them), so a user can review and edit them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from e2u_tasks.errors import E2UError

DEFAULT_TARGET = "idk"


def _read_refusals(refusal_file: str | None) -> list[str]:
    if refusal_file is None:
        text = resources.files("e2u_models").joinpath("data", "refusals.txt").read_text("utf-8")
        source = "e2u's refusal set"
    else:
        path = Path(refusal_file).expanduser()
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise E2UError(f"refusal_file {str(path)!r} does not exist") from None
        except UnicodeDecodeError:
            raise E2UError(f"refusal_file {str(path)!r} is not UTF-8 text") from None
        source = f"refusal_file {str(path)!r}"
    refusals = [line.strip() for line in text.splitlines() if line.strip()]
    if not refusals:
        raise E2UError(f"{source} is empty; give one refusal sentence per line")
    return refusals


@dataclass(frozen=True)
class RefusalTargets:
    """The target mode and the refusal sentences it draws from (or one per forget row)."""

    mode: str  # "idk", "literal", "self" or "file"
    refusals: tuple[str, ...]
    source: str
    per_row: dict | None = None  # row index -> refusal ("self" and "file" once bound)
    by_question: dict | None = None  # "file": question -> refusal, before binding to rows

    @classmethod
    def from_args(cls, target: str | None = None, refusal_file: str | None = None,
                  targets_file: str | None = None) -> RefusalTargets:
        text = DEFAULT_TARGET if target in (None, "") else str(target).strip()
        if targets_file is not None:
            if target not in (None, ""):
                raise E2UError("targets_file gives every forget row its own refusal; drop target= "
                               "(or drop targets_file)")
            return cls("file", (), f"targets_file {targets_file!r}",
                       by_question=_read_targets_file(targets_file))
        if text.lower() == "self":
            if refusal_file is not None:
                raise E2UError("refusal_file is only used with target=idk; drop one of them")
            return cls("self", (), "written by the model before editing")
        if text.lower() == DEFAULT_TARGET:
            return cls("idk", tuple(_read_refusals(refusal_file)),
                       refusal_file or "e2u_models/data/refusals.txt")
        if refusal_file is not None:
            raise E2UError("refusal_file is only used with target=idk; drop one of them")
        if len(text.split()) < 2:
            raise E2UError(f"target={text!r} is not accepted: use idk (drawn refusals), self, or a "
                           "full refusal sentence such as target=\"I don't know.\"")
        return cls("literal", (text,), "target")

    @property
    def per_question(self) -> bool:
        return self.mode in ("self", "file")

    def bind_file(self, rows: dict[int, str]) -> RefusalTargets:
        """``targets_file`` rows matched to the forget rows by question (every one needed)."""
        missing = [i for i, q in rows.items() if q not in self.by_question]
        if missing:
            raise E2UError(f"{self.source} has no target for {len(missing)} of the {len(rows)} "
                           f"forget questions (first: {rows[missing[0]]!r}); export them with "
                           "target=self,export_targets=<file> and edit that file")
        return replace(self, per_row={i: self.by_question[q] for i, q in rows.items()})

    def with_rows(self, per_row: dict[int, str]) -> RefusalTargets:
        return replace(self, per_row=dict(per_row))

    def for_row(self, index: int, seed: int) -> str:
        """The refusal of one forget row: stable under the seed, independent of the other rows."""
        if self.per_question:
            if self.per_row is None or index not in self.per_row:
                raise E2UError(f"no {self.mode} refusal target for row {index}")
            return self.per_row[index]
        if len(self.refusals) == 1:
            return self.refusals[0]
        digest = hashlib.sha256(f"e2u-refusal:{seed}:{index}".encode()).digest()
        return self.refusals[int.from_bytes(digest[:8], "big") % len(self.refusals)]

    def describe(self) -> dict:
        joined = "\n".join(self.refusals).encode("utf-8")
        info = {"mode": self.mode, "source": self.source}
        if self.per_question:
            return {**info, "rows": len(self.per_row or {})}
        return {**info, "refusals": len(self.refusals),
                "refusal_set_sha256": hashlib.sha256(joined).hexdigest()}


def _read_targets_file(path_text: str) -> dict[str, str]:
    path = Path(path_text).expanduser()
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise E2UError(f"targets_file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise E2UError(f"targets_file {str(path)!r} is not UTF-8 text") from None
    by_question = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, target = row["question"], row["target"]
            if not (isinstance(question, str) and isinstance(target, str) and target.strip()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise E2UError(f"targets_file {str(path)!r} line {number} is not a JSON object with "
                           "string 'question' and non-empty 'target'") from None
        by_question[question] = target.strip()
    if not by_question:
        raise E2UError(f"targets_file {str(path)!r} is empty; give one JSON object per line")
    return by_question
