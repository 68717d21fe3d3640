"""Loaders: the mirror by hub id, file formats, checksums and one-line errors."""

import hashlib
import json

import pytest

from e2u_tasks.data import (BENCHMARKS, HubFile, load_benchmark, load_paraphrases, question_key,
                            read_qa_file, resolve_hub_file)
from e2u_tasks.errors import E2UError
from tests.conftest import data_mirror

# sha256 prefixes of the published files (see the data facts in the README).
PUBLISHED_SHA256 = {
    "locuslab/TOFU/real_authors_perturbed.json": "a23255383ac7",
    "locuslab/TOFU/world_facts_perturbed.json": "0e171838040d",
    "xinchiqiu/PISTOL/sample_data_1.json": "0776b7c5b1c9",
}


@pytest.mark.parametrize("relative,prefix", sorted(PUBLISHED_SHA256.items()))
def test_mirror_files_are_the_published_ones(relative, prefix):
    digest = hashlib.sha256((data_mirror() / relative).read_bytes()).hexdigest()
    assert digest.startswith(prefix)


def test_tofu_factual_is_real_authors_then_world_facts():
    rows = load_benchmark("tofu_factual")
    assert len(rows) == 217
    assert [r["source"] for r in rows[:100]] == ["locuslab/TOFU/real_authors_perturbed.json"] * 100
    assert {r["source"] for r in rows[100:]} == {"locuslab/TOFU/world_facts_perturbed.json"}
    assert rows[0]["answer"] == "William Shakespeare"


def test_pistol_has_20_edges_of_20():
    rows = load_benchmark("pistol")
    edges = {}
    for row in rows:
        edges[row["edge"]] = edges.get(row["edge"], 0) + 1
    assert len(rows) == 400 and len(edges) == 20 and set(edges.values()) == {20}


@pytest.mark.parametrize("name", sorted(n for n, b in BENCHMARKS.items() if b.paraphrase_file))
def test_every_question_has_our_own_paraphrase(name):
    """Coverage: a paraphrase per question, each different from the question, keyed by hash."""
    rows = load_benchmark(name)
    paraphrases = load_paraphrases(BENCHMARKS[name].paraphrase_file)
    assert len(paraphrases) == len(rows)
    for row in rows:
        para = row["paraphrase"]
        assert para == paraphrases[question_key(row["question"])]
        normalise = lambda s: "".join(c for c in s.lower() if c.isalnum())  # noqa: E731
        assert normalise(para) != normalise(row["question"])
        assert para.endswith("?")


def test_json_lines_and_arrays_are_both_read(tmp_path):
    rows = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_qa_file(tmp_path / "a.json") == read_qa_file(tmp_path / "b.json") == rows


def test_missing_file_offline_names_id_file_and_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("E2U_DATA_DIR", str(tmp_path))
    with pytest.raises(E2UError) as info:
        resolve_hub_file(HubFile("locuslab/TOFU", "nope.json"))
    text = str(info.value)
    assert "'locuslab/TOFU'" in text and "'nope.json'" in text and "E2U_DATA_DIR" in text


def test_mirror_that_is_not_a_directory(tmp_path):
    with pytest.raises(E2UError, match="is not a directory"):
        resolve_hub_file(HubFile("locuslab/TOFU", "x.json"), data_dir=tmp_path / "missing")
