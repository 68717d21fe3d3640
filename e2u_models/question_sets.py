"""e2u's own question sets, and the rule that keeps them off the evaluated dataset.

Methods that need questions besides the forget split (WISE's irrelevant prompts, the preserved
keys of the MEMIT family) draw them from package data written for e2u — ``generic``: 600
everyday how/why questions; ``factual``: 300 trivia questions in TOFU's style — or from a user
file (one question a line). A trivia question can be about an entity the evaluated dataset asks
about (another question on *Anna Karenina*); used as preserved knowledge it would shield a forget
fact from its own edit, or a retain fact by proxy. :func:`off_dataset` drops such questions: a
question goes when it names the key entity or the gold answer of any dataset row, or when its own
key entity appears in a row's question. Names are compared word by word as written (case and
digits kept, accents folded, stop words out), so "the moon" does not match "the Moon".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from e2u_tasks.errors import E2UError
from e2u_tasks.refusal import STOP_WORDS, key_entity

QUESTION_SETS = {"generic": "generic_questions.txt", "factual": "factual_questions.txt"}
# Gold answers longer than this many words are sentences, not names: not matched.
LONGEST_ANSWER_NAME = 5


def check_question_source(name: str, hparam: str) -> None:
    """``name`` is a shipped set or an existing file (one line if not)."""
    if name in QUESTION_SETS:
        return
    if not Path(name).expanduser().is_file():
        raise E2UError(f"hparam {hparam}={name!r} is not accepted; use one of "
                       f"{', '.join(QUESTION_SETS)} or a text file with one question a line")


def load_questions(name: str) -> list[str]:
    """The questions of a shipped set or of a file, in file order, blank lines skipped."""
    if name in QUESTION_SETS:
        text = resources.files("e2u_models").joinpath("data", QUESTION_SETS[name]).read_text("utf-8")
    else:
        text = Path(name).expanduser().read_text("utf-8")
    questions = [line.strip() for line in text.splitlines() if line.strip()]
    if not questions:
        raise E2UError(f"question file {name!r} holds no questions")
    return questions


def _words(text: str) -> list[str]:
    """Words as written (accents folded, case kept: "the moon" is not "the Moon"), stop words out."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = (w.strip(".'-") for w in re.findall(r"[A-Za-z0-9][\w'.-]*", folded))
    return [w for w in words if w and w.lower() not in STOP_WORDS and (len(w) > 1 or w.isdigit())]


def _is_name(phrase: Sequence[str]) -> bool:
    return any(w[0].isupper() or w[0].isdigit() for w in phrase)


def _ngrams(words: Sequence[str], longest: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}


def _names(question: str) -> tuple[str, ...]:
    """The question's key entity as content words (empty when the heuristic finds none)."""
    entity = key_entity(question)
    return () if entity.strip() == question.strip() else tuple(_words(entity))


def off_dataset(questions: Iterable[str], dataset_rows: Sequence[tuple[str, str]]) -> list[str]:
    """The questions that share no entity or answer name with the (question, answer) rows."""
    phrases = {_names(q) for q, _ in dataset_rows}
    phrases |= {tuple(_words(answer)) for _, answer in dataset_rows
                if len(_words(answer)) <= LONGEST_ANSWER_NAME}
    phrases = {phrase for phrase in phrases if phrase and _is_name(phrase)}
    longest = max(map(len, phrases), default=0)
    questions = list(questions)
    own_names = [_names(q) for q in questions]
    longest_own = max(map(len, own_names), default=0)
    in_rows = set().union(*(_ngrams(_words(q), longest_own) for q, _ in dataset_rows))
    return [question for question, own in zip(questions, own_names)
            if not (_ngrams(_words(question), longest) & phrases)
            and not (own and _is_name(own) and own in in_rows)]
