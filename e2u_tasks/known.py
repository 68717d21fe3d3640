"""What it means that a model *knows* a row: the one rule behind the known-facts filter.

A row is known when the model's greedy answer to its question, and to its paraphrase when the
row has one, contains every word of the gold answer: ROUGE-1 recall (the metric's own function,
:func:`e2u_tasks.metrics.rouge1_recall`, Porter-stemmed unigrams) equal to 1.0. Answers are
decoded exactly as the e2u tasks decode them (greedy, the tasks' stop strings and length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from e2u_tasks.metrics import rouge1_recall, rouge1_scorer

KNOWN_RULE = ("greedy answer's ROUGE-1 recall of the gold answer == 1.0, for the question and "
              "for the paraphrase when the row has one")


def is_correct(answer: str, generation: str, scorer=None) -> bool:
    """True when ``generation`` contains every (stemmed) word of the gold ``answer``."""
    return rouge1_recall(answer, generation, scorer) >= 1.0


def phrasings(row: dict) -> list[tuple[str, str]]:
    """(``"question"``/``"paraphrase"``, text) of the phrasings a row is asked in."""
    asked = [("question", row["question"])]
    if row.get("paraphrase"):
        asked.append(("paraphrase", row["paraphrase"]))
    return asked


def judge_rows(rows: Sequence[dict], answer: Callable[[list[tuple[int, str, str]]], list[str]],
               scorer=None) -> list[dict]:
    """Ask every row in each of its phrasings and judge it by :data:`KNOWN_RULE`.

    ``answer`` gets ``(row index, question text, gold answer)`` triples and returns one greedy
    generation per triple. Returns per row ``{"index", "known", "answers": {phrasing: text},
    "failed": [phrasings answered wrongly]}``.
    """
    scorer = scorer or rouge1_scorer()
    asked = [(i, kind, text) for i, row in enumerate(rows) for kind, text in phrasings(row)]
    generations = answer([(i, text, rows[i]["answer"]) for i, _, text in asked])
    verdicts = [{"index": i, "known": True, "answers": {}, "failed": []} for i in range(len(rows))]
    for (i, kind, _), generation in zip(asked, generations):
        verdict = verdicts[i]
        verdict["answers"][kind] = generation
        if not is_correct(rows[i]["answer"], generation, scorer):
            verdict["known"] = False
            verdict["failed"].append(kind)
    return verdicts
