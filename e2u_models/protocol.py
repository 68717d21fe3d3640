"""The protocol every method implements.

A method is a module with ``NAME``, ``KIND`` ("editing", "unlearning" or "none"),
``USES_RETAIN`` (or a function ``uses_retain(hparams)`` where a setting decides it), a
hyperparameter dataclass ``HyperParams`` and
``apply(model, tokenizer, forget, retain, hparams, *, seed, env) -> MethodReport`` that edits the model
in place. Methods never import lm-eval, so they can be used and tested without the harness.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EditRequest:
    """One forget (or retain) item as a method sees it.

    ``prompt`` is the question rendered exactly as the evaluation renders it (chat template and
    system prompt included), ``answer`` the gold answer, ``target`` what the model should say
    instead (a refusal, for editing methods; None when the method needs no target).
    """

    index: int
    question: str
    prompt: str
    answer: str
    target: str | None = None
    # The row's entity when the data names one (user files may carry a ``subject`` field).
    subject: str | None = None
    # Rows merged into this request by query merging (empty when not merged).
    merged_indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class MethodEnv:
    """What a method needs from the evaluation side, so it edits exactly what is evaluated:
    ``encode`` tokenises like the evaluation, ``render`` turns a bare question into the evaluated
    prompt, ``answer_delimiter`` goes between prompt and answer; ``cache_dir`` for statistics."""

    encode: Callable[[str], list[int]]
    render: Callable[[str], str]
    answer_delimiter: str = ""
    cache_dir: str | None = None
    log: Callable[[str], None] = print
    # (question, answer) of every row of the evaluated dataset: e2u's own question sets drop the
    # questions about the same entities (see :mod:`e2u_models.question_sets`).
    dataset_rows: tuple[tuple[str, str], ...] = ()


@dataclass
class MethodReport:
    """What a method did, recorded in the results JSON (``config.e2u.method_report``)."""

    method: str
    seconds: float = 0.0
    changed_parameters: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def uses_retain(method, hparams) -> bool:
    """Whether ``method`` with these hparams reads the retain split (it is then given the retain
    requests, and the results say so)."""
    decide = getattr(method, "uses_retain", None)
    return bool(decide(hparams)) if decide is not None else bool(method.USES_RETAIN)
