"""Returning freed heap memory between an edit's phases (e2u_models.heap)."""

import sys

import pytest
import torch

from e2u_models import heap
from e2u_models.editing import vstar


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._malloc_trim() is None,
                    reason="glibc's malloc_trim only")
def test_freed_tensors_go_back_to_the_system():
    """Many small tensors freed below one that stays (so the heap cannot simply shrink from its
    top) remain resident until the heap's free pages are returned."""
    many = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each, about 250 MiB in all
    pinned = torch.ones(16 * 1024)
    del many
    before = resident_mib()
    assert heap.return_freed_memory() is True
    after = resident_mib()
    assert float(pinned.sum()) == 16 * 1024
    assert before - after > 100, f"resident memory {before:.0f} -> {after:.0f} MiB"


def test_every_v_star_optimisation_returns_its_freed_memory(tokenizer, env, monkeypatch):
    from tests.test_editing import fresh_model, hparams, make_requests
    from e2u_models.editing.requests import KeySpec, prepare_requests

    calls = []
    monkeypatch.setattr(vstar, "return_freed_memory", lambda: calls.append(1) or True)
    model = fresh_model(tokenizer)
    hp = hparams("memit", v_num_grad_steps=2)
    prepared = prepare_requests(model, tokenizer, make_requests(env, 2), KeySpec.of(hp), env, seed=0)
    vstar.optimise_targets(model, tokenizer, prepared, vstar.VStarSettings.of(hp), 1, "model.layers.1")
    assert calls == [1]


def _scoring_spy(monkeypatch):
    """Wrap ``SharedPrefixRunner.score_answers``: each call asserts that no earlier batch's
    ScoredBatch (its logits, its decoding cache) is still alive."""
    import weakref

    from e2u_models import shared_prefix

    earlier, original = [], shared_prefix.SharedPrefixRunner.score_answers

    def score_answers(self, *args, **kwargs):
        alive = [ref for ref in earlier if ref() is not None]
        assert not alive, f"{len(alive)} earlier batch(es) still held during the next forward"
        scored = original(self, *args, **kwargs)
        earlier.append(weakref.ref(scored))
        return scored

    monkeypatch.setattr(shared_prefix.SharedPrefixRunner, "score_answers", score_answers)
    return earlier


def test_target_check_releases_each_batch_before_the_next(tokenizer, env, monkeypatch):
    from tests.test_editing import fresh_model, hparams, make_requests
    from e2u_models.editing.requests import KeySpec, prepare_requests
    from e2u_models.editing.verify import target_nll

    batches = _scoring_spy(monkeypatch)
    model = fresh_model(tokenizer)
    prepared = prepare_requests(model, tokenizer, make_requests(env, 4), KeySpec.of(hparams("memit")), env, seed=0)
    assert len(target_nll(model, tokenizer, prepared, batch_size=2)) == 4
    assert len(batches) == 2


def test_answering_releases_each_batch_before_the_next(tiny_lm, monkeypatch):
    from tests.test_e2u_answer import CASES, stats_request

    batches = _scoring_spy(monkeypatch)
    monkeypatch.setattr(tiny_lm, "batch_size_per_gpu", 1)
    assert len(tiny_lm.e2u_answer([stats_request(c, a, prompt="rendered") for c, a in CASES],
                                  disable_tqdm=True)) == len(CASES)
    assert len(batches) == len(CASES)


def test_greedy_continuations_release_each_batch_before_the_next(tiny_lm, monkeypatch):
    from e2u_models.nethook import pad_id_of
    from e2u_models.shared_prefix import continue_greedily

    batches = _scoring_spy(monkeypatch)
    encoded = [tiny_lm.tokenizer(text)["input_ids"] for text in ("What is the capital", "Who wrote", "The farm")]
    out = continue_greedily(tiny_lm.model, encoded, pad_id_of(tiny_lm.tokenizer), 3, lambda row, tokens: False,
                            batch_size=1)
    assert [len(tokens) for tokens in out] == [3, 3, 3] and len(batches) == 3
