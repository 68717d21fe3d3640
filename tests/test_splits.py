"""The split spec shared by model and tasks: pinned defaults, edges, own data, mismatches."""

import json

import pytest

from e2u_tasks.errors import E2UError
from e2u_tasks.splits import SplitSpec, seeded_sample

# The default TOFU-factual forget set (forget_size=40, forget_seed=0). Pinned: changing it would
# silently change every published number. Also printed in docs/tasks-and-metrics.md.
DEFAULT_TOFU_FORGET = (
    7, 8, 21, 27, 32, 38, 39, 41, 42, 48, 51, 52, 53, 58, 70, 71, 72, 75, 80, 88,
    97, 107, 116, 117, 125, 130, 134, 136, 159, 163, 165, 173, 174, 175, 178, 186, 210, 211, 212, 214,
)


def test_default_tofu_forget_indices_are_pinned():
    splits = SplitSpec.from_args({}).load()
    assert splits.forget == DEFAULT_TOFU_FORGET
    assert len(splits.retain) == 177 and not set(splits.retain) & set(splits.forget)


def test_seeded_sample_is_nested_and_seed_dependent():
    assert set(seeded_sample(217, 20, 0)) <= set(seeded_sample(217, 40, 0))
    assert seeded_sample(217, 40, 0) != seeded_sample(217, 40, 1)
    assert seeded_sample(217, 40, 3) == seeded_sample(217, 40, 3)


def test_pistol_forgets_one_edge_by_default():
    splits = SplitSpec.from_args({"dataset": "pistol"}).load()
    assert len(splits.forget) == 20 and len(splits.retain) == 380
    assert {splits.rows[i]["edge"] for i in splits.forget} == {"A_B"}
    two = SplitSpec.from_args({"dataset": "pistol", "forget_edge": "A_B+A_C"}).load()
    assert len(two.forget) == 40


def _parties(rows: list[dict]) -> dict[str, frozenset[str]]:
    """Each edge's two contracting companies as the questions name them ("... between X and Y?"),
    the most frequent pair: an account of adjacency independent of the edge labels."""
    import re
    from collections import Counter

    pairs: dict[str, Counter] = {}
    for row in rows:
        match = re.search(r"between (.+?) and (.+?)[?,]", row["question"])
        if match:
            pairs.setdefault(row["edge"], Counter())[frozenset(match.groups())] += 1
    return {edge: counter.most_common(1)[0][0] for edge, counter in pairs.items()}


@pytest.mark.parametrize("edges,adjacent_edges", [
    ("A_B", {"A_C", "A_C2", "A_C3", "A_m", "A_n", "A_n2", "A_n3",
             "B_D", "B_D2", "B_D3", "B_p", "B_p2", "B_p3"}),
    ("A_C+E1_F1", {"A_B", "A_C2", "A_C3", "A_m", "A_n", "A_n2", "A_n3", "E1_q1"}),
])
def test_pistol_retain_parts_by_shared_party(edges, adjacent_edges):
    splits = SplitSpec.from_args({"dataset": "pistol", "forget_edge": edges}).load()
    parts = splits.retain_parts()
    edge_of = {i: splits.rows[i]["edge"] for i in range(len(splits.rows))}
    assert {edge_of[i] for i in parts["retain_adjacent"]} == adjacent_edges
    assert len(parts["retain_adjacent"]) == 20 * len(adjacent_edges)
    # the two parts are the retain rows, each once, in retain's order
    assert sorted(parts["retain_adjacent"] + parts["retain_far"]) == list(splits.retain)
    assert not set(parts["retain_adjacent"]) & set(parts["retain_far"])
    # the same partition from the company names in the questions
    parties = _parties(list(splits.rows))
    forgotten = frozenset().union(*(parties[e] for e in edges.split("+")))
    assert {e for e in parties if e not in edges.split("+") and parties[e] & forgotten} == adjacent_edges
    docs = splits.docs("retain_far")
    assert [d["index"] for d in docs] == list(parts["retain_far"])
    assert {d["split"] for d in docs} == {"retain_far"}
    described = splits.describe()
    assert described["retain_adjacent_rows"] + described["retain_far_rows"] == described["retain_rows"]


def test_pistol_retain_parts_of_forget_indices_follow_their_edges():
    """Forgetting some rows of an edge: the edge's other rows are adjacent (same parties)."""
    splits = SplitSpec.from_args({"dataset": "pistol", "forget_indices": "0;1"}).load()
    edge = splits.rows[0]["edge"]
    adjacent = splits.retain_parts()["retain_adjacent"]
    assert {i for i in range(len(splits.rows)) if splits.rows[i]["edge"] == edge} - {0, 1} <= set(adjacent)


def test_retain_parts_need_a_dataset_with_entities():
    splits = SplitSpec.from_args({}).load()
    with pytest.raises(E2UError, match="retain_adjacent/retain_far splits need a dataset whose "
                                       "groups connect entities \\(pistol\\), not 'tofu_factual'"):
        splits.docs("retain_adjacent")
    assert "retain_adjacent_rows" not in splits.describe()


def test_rephrase_docs_keep_answers_and_change_questions():
    splits = SplitSpec.from_args({}).load()
    forget, rephrase = splits.docs("forget"), splits.docs("rephrase")
    assert [d["index"] for d in forget] == [d["index"] for d in rephrase]
    assert all(f["answer"] == r["answer"] and f["question"] != r["question"]
               for f, r in zip(forget, rephrase))


def test_own_data_with_indices_and_size(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"A{i}", "paraphrase": f"Which Q{i}?"} for i in range(10)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    by_index = SplitSpec.from_args({"dataset": str(path), "forget_indices": "[1, 3]"}).load()
    assert by_index.forget == (1, 3) and len(by_index.retain) == 8
    assert SplitSpec.from_args({"dataset": str(path), "forget_indices": "3;1"}).load().forget == (1, 3)
    by_size = SplitSpec.from_args({"dataset": str(path), "forget_size": 4, "forget_seed": 2}).load()
    assert len(by_size.forget) == 4
    assert by_size.docs("rephrase")[0]["question"].startswith("Which")


def test_task_refuses_a_dataset_the_model_did_not_forget():
    with pytest.raises(E2UError, match="task evaluates 'pistol' but the model args say"):
        SplitSpec.for_task("pistol", {"dataset": "tofu_factual", "method": "none"})
    with pytest.raises(E2UError, match="add dataset=pistol"):
        SplitSpec.for_task("pistol", {"method": "rome"})
    # method=none forgot nothing: every benchmark task evaluates its own default split.
    assert SplitSpec.for_task("pistol", {"method": None}).dataset == "pistol"
    assert SplitSpec.for_task("tofu_factual", {"method": "rome"}).dataset == "tofu_factual"
