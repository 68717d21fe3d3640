"""Preserved question keys (``preserve_questions``) and the rule that keeps e2u's own question sets
off the evaluated dataset."""

import dataclasses

import pytest
import torch

from e2u_models.methods import alphaedit
from e2u_models.hparams import load_hparams
from e2u_models.editing.keys import read_at_keys
from e2u_models.editing.requests import question_key_rows
from e2u_models.editing.stats import StatsSpec, statistics_for
from e2u_models.question_sets import load_questions, off_dataset
from e2u_tasks.errors import E2UError
from tests.conftest import build_tiny_model

QUESTIONS = ["Who painted the Mona Lisa?", "Why is the sky blue?", "Where is Mount Kenya?"]


def test_questions_about_the_datasets_entities_or_answers_are_dropped():
    rows = [("Who wrote 'Anna Karenina'?", "Leo Tolstoy"), ("Who was the first person on the Moon?",
                                                          "Neil Armstrong")]
    offered = ["Which Russian novelist wrote Anna Karenina in 1878?",   # the row's entity
               "Which novel by Leo Tolstoy is set during Napoleon's invasion?",  # a row's answer
               "Which planet is closest to the Sun?",                   # nothing shared
               "Why does the moon change shape?",                       # "moon" is no name
               "Who founded Karenina Books?"]                           # not the whole entity
    assert off_dataset(offered, rows) == offered[2:]
    # the other direction: the question's own entity named in a row's question
    assert off_dataset(["In which year was the novel 'Anna' printed?"], [("Who wrote Anna?", "x")]) == []
    assert off_dataset(offered, []) == offered


def test_the_shipped_sets_against_tofu_factual():
    """Every generic question survives (they name no entity); the factual set loses its questions
    about TOFU's entities and keeps the rest."""
    from e2u_tasks.data import load_benchmark
    from tests.conftest import data_mirror

    rows = [(r["question"], r["answer"]) for r in load_benchmark("tofu_factual", data_mirror())]
    assert off_dataset(load_questions("generic"), rows) == load_questions("generic")
    factual = load_questions("factual")
    kept = off_dataset(factual, rows)
    assert 150 < len(kept) < len(factual)
    # TOFU's answer to "'Great Expectations' is a novel by which author?"
    assert "In which Charles Dickens story does the miser Ebenezer Scrooge appear?" not in kept
    assert "Which Russian writer is the author of The Brothers Karamazov?" in kept


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny_model(tokenizer, seed=5)


def test_preserved_moment_is_added_to_the_corpus_moment(tiny, tokenizer, env, tmp_path):
    """C = corpus moment + w · mean of k kᵀ at each question's key token (subject_last here), read
    exactly like an edit's keys; the second call reads the cache without a forward pass."""
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    env = dataclasses.replace(env, cache_dir=str(tmp_path / "cache"), dataset_rows=(("Who is X?", "Y"),))
    plain = load_hparams(alphaedit.HyperParams, "alphaedit", None,
                         {"layers": [0, 1], "fact_token": "subject_last", "stats_corpus": "python-docs",
                          "mom2_n_tokens": 200}, config=tiny.config)
    preserving = dataclasses.replace(plain, preserve_questions=str(questions), preserve_weight=3.0)
    base, _ = statistics_for(tiny, tokenizer, StatsSpec.of(plain), [0, 1], env)
    moments, provenance = statistics_for(tiny, tokenizer, StatsSpec.of(preserving), [0, 1], env)
    rows = question_key_rows(tokenizer, QUESTIONS, "subject_last", env)
    ends = [tokenizer.decode(r.ids) for r in rows]
    assert ends[0].endswith("Mona Lisa") and ends[1].endswith("sky blue?") and ends[2].endswith("Mount Kenya")
    module = "model.layers.1.mlp.down_proj"
    keys = read_at_keys(tiny, tokenizer, rows, {module: "input"})[module].double()
    expected = base[1].double() + 3.0 * keys.T @ keys / len(rows)
    assert torch.allclose(moments[1].double(), expected, rtol=1e-5, atol=1e-6)
    assert provenance["preserved"]["kept"] == 3 and provenance["preserved"]["weight"] == 3.0
    forward = tiny.forward
    tiny.forward = lambda *a, **k: pytest.fail("recomputed")
    try:
        again, _ = statistics_for(tiny, tokenizer, StatsSpec.of(preserving), [0, 1], env)
    finally:
        tiny.forward = forward
    assert torch.equal(again[1], moments[1])


def test_preserving_makes_the_edit_leave_the_preserved_keys_alone(tiny, tokenizer, env, tmp_path):
    """The point of it: with the preserved questions' keys in C, AlphaEdit's update moves those
    keys less (relative to the edited key) than without."""
    env = dataclasses.replace(env, cache_dir=str(tmp_path / "cache"))
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(f"Where does the {w} river flow?" for w in
                                   ("long", "wide", "old", "cold", "slow", "deep")) + "\n")
    hp = load_hparams(alphaedit.HyperParams, "alphaedit", None,
                      {"layers": [1], "stats_corpus": "python-docs", "mom2_n_tokens": 200,
                       "nullspace_threshold": 1.0, "L2": 0.1}, config=tiny.config)
    module = "model.layers.1.mlp.down_proj"
    preserved = read_at_keys(tiny, tokenizer, question_key_rows(
        tokenizer, load_questions(str(questions)), hp.fact_token, env), {module: "input"})[module].double()
    edited = read_at_keys(tiny, tokenizer, question_key_rows(
        tokenizer, ["What does the teacher eat?"], hp.fact_token, env), {module: "input"})[module].double()
    residual = torch.ones(1, tiny.config.hidden_size, dtype=torch.float64)

    def spill(hparams):
        moments, _ = statistics_for(tiny, tokenizer, StatsSpec.of(hparams), [1], env)
        editor = alphaedit.AlphaEditor(tiny, tokenizer, hparams, [1], moments, lambda *_: None)
        update = editor.solve(1, edited, residual)
        return float((preserved @ update.T).norm(dim=1).mean() / (edited @ update.T).norm())

    assert spill(dataclasses.replace(hp, preserve_questions=str(questions), preserve_weight=100.0)) \
        < 0.5 * spill(hp)


def test_bad_preserve_hparams_are_one_line_errors(tmp_path):
    with pytest.raises(E2UError, match="preserve_questions='nope.txt' is not accepted; use one of generic, factual"):
        load_hparams(alphaedit.HyperParams, "alphaedit", None, {"preserve_questions": "nope.txt"})
    with pytest.raises(E2UError, match="preserve_weight=-1.0 must be >= 0"):
        load_hparams(alphaedit.HyperParams, "alphaedit", None, {"preserve_weight": -1.0})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(E2UError, match="holds no questions"):
        load_questions(str(empty))


def test_wises_irrelevant_questions_follow_the_same_rule():
    from e2u_models.methods import wise

    hp = load_hparams(wise.HyperParams, "wise", None, {"irrelevant_set": "factual"})
    rows = [("Who wrote 'Wuthering Heights'?", "Emily Bronte")]
    drawn = wise.irrelevant_prompts(hp, 600, 0, str, rows)
    assert not any("Wuthering Heights" in q for q in drawn)
    assert len(set(drawn)) == len(off_dataset(load_questions("factual"), rows)) == 299
