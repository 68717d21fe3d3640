"""``e2u_general_mc``: e2u's own offline utility benchmark, four-choice general-knowledge and
commonsense questions (science, geography, history, arts, everyday reasoning, units, language)
written for e2u, so a run can measure what an edit cost the model elsewhere without the hub.

A stock lm-eval ``multiple_choice`` task (``acc``, ``acc_norm``): any model class serves it, and
``e2u report`` shows it, like ``mmlu`` or ``hellaswag``, next to the method's composite.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from datasets import Dataset, DatasetDict

from e2u_tasks.errors import E2UError

GENERAL_MC_FILE = "general_mc/general_mc.jsonl"
CHOICES = 4


def general_mc_rows() -> list[dict]:
    """The questions (package data): ``id``, ``topic``, ``question``, ``choices`` (four) and
    ``answer`` (index of the correct choice)."""
    source = resources.files("e2u_tasks").joinpath("data", GENERAL_MC_FILE)
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        choices, answer = row.get("choices"), row.get("answer")
        if (not isinstance(choices, list) or len(choices) != CHOICES or not isinstance(answer, int)
                or not 0 <= answer < CHOICES):
            raise E2UError(f"e2u_tasks/data/{GENERAL_MC_FILE} row {row.get('id')!r} needs "
                           f"{CHOICES} choices and an answer index 0..{CHOICES - 1}")
    return rows


def load_general_mc(**metadata: Any) -> DatasetDict:
    """``custom_dataset`` hook of ``e2u_general_mc.yaml`` (lm-eval passes the task's metadata,
    which this task does not use: the questions are the same for every model and method)."""
    return DatasetDict({"test": Dataset.from_list(general_mc_rows())})
