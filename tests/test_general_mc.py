"""e2u_general_mc, e2u's own offline utility benchmark: a well-formed data file."""

from collections import Counter

from e2u_tasks.general_mc import general_mc_rows, load_general_mc


def test_general_mc_data_is_well_formed():
    rows = general_mc_rows()
    assert len(rows) >= 200
    for row in rows:
        assert set(row) == {"id", "topic", "question", "choices", "answer"}
        assert len(row["choices"]) == 4 and len({c.strip().lower() for c in row["choices"]}) == 4
        assert all(isinstance(c, str) and c.strip() for c in row["choices"])
        assert row["question"].strip().endswith("?")
    questions = [" ".join(r["question"].lower().split()) for r in rows]
    assert len(set(questions)) == len(questions), "duplicate questions"
    assert len({r["id"] for r in rows}) == len(rows)
    # the correct answer equally often at A, B, C and D (a model that always picks one letter
    # or one position scores 25%)
    positions = Counter(r["answer"] for r in rows)
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) - min(positions.values()) <= 1
    topics = Counter(r["topic"] for r in rows)
    assert set(topics) == {"science", "geography", "history", "arts", "reasoning", "units", "language"}
    assert min(topics.values()) >= 20


def test_general_mc_loads_as_one_test_split():
    dataset = load_general_mc(pretrained="ignored", method="memit")
    assert list(dataset) == ["test"] and len(dataset["test"]) == len(general_mc_rows())
