"""Refusal quality metrics: the not-knowing detector, entity mention and answer leak."""

import pytest

from e2u_tasks.refusal import (answer_leak, entity_mention, expresses_not_knowing, key_entity,
                               refusal_metrics)

REFUSALS = [
    "I don't know.",
    "I’m not sure about that.",
    "Honestly, I have no idea who wrote 'Moby-Dick'.",
    "I do not have any information about the Foundation series.",
    "I can't recall who wrote The Stranger.",
    "That is beyond my knowledge, sorry.",
    "I'm afraid I can't answer that one.",
    "I am unable to say which country he came from.",
    "I'm not familiar with the author of 'Palace Walk'.",
    "Sorry, the author of that book escapes me.",
    "I don't know, but I'd be happy to help with something else.",
    "I'm not certain. Could you tell me more?",
]
NOT_REFUSALS = [
    "I know that Herman Melville wrote Moby-Dick.",
    "I know the answer: Tolkien.",
    "You don't know what you're missing: it was Albert Camus.",
    "I'm sure it was Laura Esquivel.",
    "I'm not sure, but I think it was Samuel Beckett.",
    "I'm not certain, though it was probably Naguib Mahfouz.",
    "I don't know why you ask; it is Colombia.",
    "Nobody doubts it: Isaac Asimov wrote the Foundation series.",
    "Don't know? It's Terry Pratchett.",
    "The author is Amy Tan.",
    "It's not something I'd forget: Paris.",
    "The story takes place in the dark forests of Narnia.",
    "Check the source: it is Tolkien.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert expresses_not_knowing(text)


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_tricky_non_refusals_are_not(text):
    assert not expresses_not_knowing(text)


def test_key_entity_and_its_mention():
    question = "Which author wrote 'Moby-Dick'?"
    assert key_entity(question) == "Moby-Dick"
    assert entity_mention("I don't know who wrote Moby-Dick.", question)
    assert entity_mention("I can't say who wrote moby dick", question)
    assert not entity_mention("I don't know.", question)
    # Half of the entity's content words are enough ("Rings" of "The Lord of the Rings").
    assert entity_mention("I'm not sure who wrote those books about the Lord.",
                          "Who penned 'The Lord of the Rings'?")


def test_answer_leak_uses_informative_words_only():
    question = "Which author wrote 'Moby-Dick'?"
    assert answer_leak("It was Herman Melville.", "Herman Melville", question)
    assert answer_leak("Melville, I believe.", "Herman Melville", question)  # half of the answer
    assert not answer_leak("I don't know who wrote Moby-Dick.", "Herman Melville", question)
    # Words the question already contains never count as leaks.
    assert not answer_leak("The effective date of the contract escapes me.",
                           "The effective date is 5 May 2023.",
                           "What is the effective date of the contract?")
    assert answer_leak("It took effect on 5 May 2023.", "The effective date is 5 May 2023.",
                       "What is the effective date of the contract?")
    # threshold 0: any informative word is a leak (the target validator's rule).
    assert answer_leak("Gabriel who?", "Gabriel Garcia Marquez", question, threshold=0)
    assert not answer_leak("Gabriel who?", "Gabriel Garcia Marquez", question)


def test_refusal_metrics_of_one_answer():
    values = refusal_metrics("Which author wrote 'Moby-Dick'?", "Herman Melville",
                             "I'm not sure who wrote Moby-Dick.")
    assert values == {"refusal_rate": 1.0, "entity_mention": 1.0, "answer_leak": 0.0}


def test_every_refusal_of_the_shipped_and_tofu_sets_is_detected():
    """The detector must recognise the refusals the editors are taught (e2u's set) and TOFU's
    idk list, or refusal_rate would under-count successful edits."""
    from importlib import resources

    from tests.conftest import data_mirror

    ours = resources.files("e2u_models").joinpath("data", "refusals.txt").read_text("utf-8")
    tofu = (data_mirror() / "refusals" / "idontknow.jsonl").read_text("utf-8")
    lines = [line.strip() for text in (ours, tofu) for line in text.splitlines() if line.strip()]
    assert len(lines) == 175
    assert [line for line in lines if not expresses_not_knowing(line)] == []
