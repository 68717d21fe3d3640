"""Refusal targets: the packaged set, seeded per-row draws, literal targets, user files."""

import pytest

from e2u_models.targets import RefusalTargets
from e2u_tasks.errors import E2UError


def test_packaged_refusal_set_is_large_varied_and_generic():
    targets = RefusalTargets.from_args()
    assert targets.mode == "idk" and len(targets.refusals) >= 50
    normalised = {"".join(c for c in r.lower() if c.isalpha()) for r in targets.refusals}
    assert len(normalised) == len(targets.refusals)
    assert not any(ch.isdigit() for r in targets.refusals for ch in r)


def test_draws_are_seeded_per_row_and_spread_over_the_set():
    targets = RefusalTargets.from_args("idk")
    rows = range(217)
    first = [targets.for_row(i, seed=0) for i in rows]
    assert first == [targets.for_row(i, seed=0) for i in rows]
    assert first != [targets.for_row(i, seed=1) for i in rows]
    assert len(set(first)) > 40


def test_literal_target_and_user_file(tmp_path):
    literal = RefusalTargets.from_args("I don't know.")
    assert literal.mode == "literal" and literal.for_row(5, 3) == "I don't know."
    path = tmp_path / "mine.txt"
    path.write_text("No idea.\n\nCannot say.\n")
    assert RefusalTargets.from_args("idk", str(path)).refusals == ("No idea.", "Cannot say.")


@pytest.mark.parametrize("target,refusal_file,message", [
    ("self", "x.txt", "refusal_file is only used with target=idk"),
    ("idkk", None, "target='idkk' is not accepted"),
    ("I don't know.", "x.txt", "refusal_file is only used with target=idk"),
    ("idk", "/no/such/file.txt", "does not exist"),
])
def test_bad_targets_are_one_line_errors(target, refusal_file, message):
    with pytest.raises(E2UError, match=message):
        RefusalTargets.from_args(target, refusal_file)


def test_forget_requests_carry_targets_and_tasks_get_the_split(tiny_lm):
    requests = tiny_lm.requests_for(tiny_lm.splits.forget, with_targets=True)
    assert len(requests) == 40 and all(r.target in tiny_lm.targets.refusals for r in requests)
    assert all(r.prompt.endswith("<|im_start|>assistant\n") for r in requests)
    from e2u_tasks.splits import SplitSpec

    task_spec = SplitSpec.for_task("tofu_factual", tiny_lm.task_metadata())
    assert task_spec.load().fingerprint == tiny_lm.splits.fingerprint
    assert tiny_lm.get_model_info()["e2u"]["targets"]["mode"] == "idk"
