"""Data-parallel correctness (``accelerate launch -m lm_eval --model e2u``), tested on CPU:
every rank must end with the same edited weights.

Two guarantees: editing is deterministic given its inputs (two independent edits, no cache, give
bit-identical weights), and under ``accelerate`` rank 0 edits first and fills the edit cache, the
other ranks then load that edit (bit-exact, verified by sha256).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from e2u_models.model import E2ULM

FAST = {"forget_size": 3, "v_num_grad_steps": 3, "mom2_n_tokens": 2000, "mom2_max_length": 64,
        "layers": "[0]", "device": "cpu", "batch_size": 4}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> str:
    """One cache folder for the module, so the statistics are collected once (as on one machine)."""
    return str(tmp_path_factory.mktemp("e2u-cache"))


def weights(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_two_independent_edits_are_bit_identical(tiny_model_dir, shared_cache, method):
    """Two ranks' worth of editing: separate model loads, no edit cache (the statistics cache is
    shared, as on one machine): the edited weights agree bit for bit."""
    runs = [E2ULM(pretrained=tiny_model_dir, method=method, cache="false", cache_dir=shared_cache,
                  **FAST) for _ in range(2)]
    first, second = weights(runs[0]), weights(runs[1])
    changed = runs[0].method_report.changed_parameters
    assert changed and all(torch.equal(first[n], second[n]) for n in first)
    assert runs[0].model_sha256 == runs[1].model_sha256  # same starting weights, recorded
    original = E2ULM(pretrained=tiny_model_dir, method="none", **{k: v for k, v in FAST.items()
                                                                    if k in ("device", "batch_size")})
    assert any(not torch.equal(first[n], weights(original)[n]) for n in changed)  # it did edit


class FakeAccelerator:
    """Records what happens inside ``main_process_first`` (what rank 0 runs before the others)."""

    def __init__(self) -> None:
        self.inside = False
        self.events: list[str] = []

    def unwrap_model(self, model):
        return model

    @contextlib.contextmanager
    def main_process_first(self):
        self.inside = True
        self.events.append("enter")
        yield
        self.events.append("exit")
        self.inside = False


def test_under_accelerate_the_edit_runs_inside_main_process_first(tiny_model_dir, shared_cache, monkeypatch):
    """Rank 0 edits inside ``main_process_first`` (the others wait), then a second rank, with the
    same arguments, loads rank 0's edit from the cache: same weights, no second edit."""
    from lm_eval.models.huggingface import HFLM

    accelerator = FakeAccelerator()
    original_init = HFLM.__init__

    def init_with_accelerator(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.accelerator = accelerator  # what HFLM sets under `accelerate launch`

    from e2u_models import pipeline

    seen = []
    original_apply = pipeline.apply_method

    def apply_and_record(*args, **kwargs):
        seen.append(accelerator.inside)
        return original_apply(*args, **kwargs)

    monkeypatch.setattr(HFLM, "__init__", init_with_accelerator)
    monkeypatch.setattr(pipeline, "apply_method", apply_and_record)
    args = {**FAST, "seed": 11}  # an edit no other test caches
    rank0 = E2ULM(pretrained=tiny_model_dir, method="memit", cache_dir=shared_cache, **args)
    rank1 = E2ULM(pretrained=tiny_model_dir, method="memit", cache_dir=shared_cache, **args)
    assert seen == [True, True] and accelerator.events == ["enter", "exit"] * 2
    assert rank0.method_report.details["edit_cache"]["hit"] is False
    assert rank1.method_report.details["edit_cache"]["hit"] is True
    a, b = weights(rank0), weights(rank1)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_results_carry_the_run_card(tiny_model_dir, shared_cache):
    lm = E2ULM(pretrained=tiny_model_dir, method="memit", cache_dir=shared_cache, **FAST)
    info = lm.get_model_info()["e2u"]
    card = info["run_card"]
    assert set(card) == {"edit", "evaluation", "targets"}
    assert card["targets"]["requests"] == len(info["method_report"]["details"]["verification"]["requests"])
    for phase in (card["edit"], card["evaluation"]):
        assert phase["seconds"] >= 0 and phase["peak_rss_bytes"] > 50 * 2**20
    assert "cuda_peak_bytes" not in card["edit"]  # CPU run
    assert len(info["model_sha256"]) == 64
    assert info["split"]["forget_row_indices"] and info["seed"] == 0 and info["packages"]["torch"]
    fingerprint = info["fingerprint"]
    assert fingerprint["device_type"] == "cpu" and fingerprint["dtype"] == "float32"
    assert fingerprint["threads"] == torch.get_num_threads() and fingerprint["device_name"]
    assert fingerprint["torch"] == info["packages"]["torch"]
    assert fingerprint["deterministic_algorithms"] is False
