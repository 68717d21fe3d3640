"""Refusal targets: what an editing method teaches the model to say instead of the answer.

``target=idk`` (default) draws one refusal per forget row from a refusal set: e2u's own 75
sentences (``e2u_models/data/refusals.txt``) or ``refusal_file=<file>`` (one sentence a line).
The draw is keyed by a hash of (seed, row index), so a row keeps its refusal whatever else is
forgotten. ``target=<a sentence>`` uses one fixed refusal for every row. Self-written, per-question
refusals (``target=self``) are planned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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
    """The target mode and the refusal sentences it draws from."""

    mode: str  # "idk" or "literal"
    refusals: tuple[str, ...]
    source: str

    @classmethod
    def from_args(cls, target: str | None = None, refusal_file: str | None = None) -> RefusalTargets:
        text = DEFAULT_TARGET if target in (None, "") else str(target).strip()
        if text.lower() == "self":
            raise E2UError("target=self (refusals written by the model itself) is planned but not "
                           "implemented in this release; use target=idk or target=<a refusal sentence>")
        if text.lower() == DEFAULT_TARGET:
            return cls("idk", tuple(_read_refusals(refusal_file)),
                       refusal_file or "e2u_models/data/refusals.txt")
        if refusal_file is not None:
            raise E2UError("refusal_file is only used with target=idk; drop one of them")
        if len(text.split()) < 2:
            raise E2UError(f"target={text!r} is not accepted: use idk (drawn refusals), self, or a "
                           "full refusal sentence such as target=\"I don't know.\"")
        return cls("literal", (text,), "target")

    def for_row(self, index: int, seed: int) -> str:
        """The refusal of one forget row: stable under the seed, independent of the other rows."""
        if len(self.refusals) == 1:
            return self.refusals[0]
        digest = hashlib.sha256(f"e2u-refusal:{seed}:{index}".encode()).digest()
        return self.refusals[int.from_bytes(digest[:8], "big") % len(self.refusals)]

    def describe(self) -> dict:
        joined = "\n".join(self.refusals).encode("utf-8")
        return {"mode": self.mode, "source": self.source, "refusals": len(self.refusals),
                "refusal_set_sha256": hashlib.sha256(joined).hexdigest()}
