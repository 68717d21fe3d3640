"""target=self: the model writes its own refusals, validated, cached, exported and re-imported."""

import json

import pytest

import e2u_models.self_targets as self_targets
from e2u_models.model import E2ULM
from e2u_models.self_targets import refusal_problems
from e2u_tasks.errors import E2UError

FAST = {"method": "memit", "device": "cpu", "batch_size": 4, "forget_size": 3,
        "v_num_grad_steps": 2, "mom2_n_tokens": 1000, "layers": "[0]"}


def test_validator_rejects_the_gold_answer_and_non_refusals():
    question, gold = "Which author wrote 'Moby-Dick'?", "Herman Melville"
    assert refusal_problems("I don't know who wrote Moby-Dick.", question, gold) == []
    assert "contains the gold answer" in refusal_problems(
        "I don't know, maybe Herman Melville wrote Moby-Dick?", question, gold)
    assert "contains the gold answer" in refusal_problems(
        "I'm not sure Melville wrote Moby-Dick.", question, gold)
    assert "does not express not knowing" in refusal_problems("Moby-Dick is a whale.", question, gold)
    assert "does not mention 'Moby-Dick'" in refusal_problems("I don't know.", question, gold)
    assert refusal_problems("  ", question, gold) == ["empty"]
    assert "repeats itself" in refusal_problems(
        "I don't know who wrote Moby-Dick Ma'am Ma'am Ma'am.", question, gold)
    # Accents are folded and "I'm" is no leak of a one-letter word of the answer.
    assert refusal_problems("I'm not sure who wrote 'Love in the Time of Cholera'.",
                            "Who wrote 'Love in the Time of Cholera'?", "Gabriel García Márquez") == []
    assert "contains the gold answer" in refusal_problems(
        "I'm not sure Garcia wrote 'Love in the Time of Cholera'.",
        "Who wrote 'Love in the Time of Cholera'?", "Gabriel García Márquez")


def test_invalid_candidates_are_regenerated_then_fall_back(tiny_model_dir, tmp_path, monkeypatch):
    """Scripted generations: attempt 1 leaks the answer, attempt 2 is valid for one row only;
    the other rows end on the template that names their entity."""
    calls = []

    def scripted(model, tokenizer, prompts, sample_seed, batch_size):
        calls.append(sample_seed)
        question_of = [p.rsplit("Question: ", 1)[-1] if "Question: " in p else p for p in prompts]
        if sample_seed is None:
            return ["It was surely the famous one." for _ in prompts]
        return ["I don't know who wrote Moby-Dick." if "Moby-Dick" in q else "No comment."
                for q in question_of]

    monkeypatch.setattr(self_targets, "_generate", scripted)
    lm = E2ULM(pretrained=tiny_model_dir, cache_dir=str(tmp_path), target="self",
               forget_indices="[1, 2, 8]", export_targets=str(tmp_path / "t.jsonl"),
               **{k: v for k, v in FAST.items() if k != "forget_size"})
    assert calls[0] is None and len(calls) == self_targets.ATTEMPTS
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    by_question = {r["question"]: r for r in rows}
    moby = by_question["Which author wrote 'Moby-Dick'?"]
    assert moby["source"] == "self" and moby["attempts"] == 2
    assert moby["target"] == "I don't know who wrote Moby-Dick."
    others = [r for r in rows if r is not moby]
    assert all(r["source"] == "fallback" and r["problems"] for r in others)
    assert all(refusal_problems(r["target"], r["question"], r["answer"]) == [] for r in others)
    info = lm.get_model_info()["e2u"]["targets"]
    assert info["mode"] == "self" and len(info["fallbacks"]) == 2 and info["cache_hit"] is False
    # The editor was given exactly these targets.
    targets = {r["index"]: r["target"] for r in rows}
    assert all(lm.targets.for_row(i, 0) == targets[i] for i in targets)


def test_self_targets_are_cached_and_can_be_edited_and_reimported(tiny_model_dir, tmp_path):
    first = E2ULM(pretrained=tiny_model_dir, cache_dir=str(tmp_path), target="self",
                  export_targets=str(tmp_path / "t.jsonl"), **FAST)
    assert first.get_model_info()["e2u"]["targets"]["cache_hit"] is False
    again = E2ULM(pretrained=tiny_model_dir, cache_dir=str(tmp_path), target="self", **FAST)
    assert again.get_model_info()["e2u"]["targets"]["cache_hit"] is True
    assert again.targets.per_row == first.targets.per_row
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    rows[0]["target"] = "I honestly do not know that one."
    (tmp_path / "edited.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    imported = E2ULM(pretrained=tiny_model_dir, cache_dir=str(tmp_path),
                     targets_file=str(tmp_path / "edited.jsonl"), **FAST)
    assert imported.targets.for_row(rows[0]["index"], 0) == "I honestly do not know that one."
    assert imported.get_model_info()["e2u"]["targets"]["mode"] == "file"


def test_a_targets_file_must_cover_every_forget_question(tiny_model_dir, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"question": "Unrelated?", "target": "I don't know."}) + "\n")
    with pytest.raises(E2UError, match="has no target for 3 of the 3 forget questions"):
        E2ULM(pretrained=tiny_model_dir, cache_dir=str(tmp_path),
              targets_file=str(tmp_path / "t.jsonl"), **FAST)
