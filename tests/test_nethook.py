"""The engines' toolkit: the pad rule, tracing with an early stop, output rewriting, the layer
runner and the weight snapshot."""

from types import SimpleNamespace

import pytest
import torch

from e2u_models.layers import LayerRunner, additive_mask
from e2u_models.nethook import StopForward, forward_until_stopped, pad_id_of, pad_right, trace
from e2u_models.snapshot import WeightSnapshot, restored_on_failure
from tests.conftest import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=1, layers=3), tokenizer


def test_one_pad_rule():
    assert pad_id_of(SimpleNamespace(pad_token_id=7, eos_token_id=5), eot_id=9) == 7
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=5), eot_id=9) == 9
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=5)) == 5
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    ids, mask = pad_right([[1, 2, 3], [4]], 0, "cpu")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_trace_stops_the_forward_and_removes_its_hooks(tiny):
    model, _ = tiny
    seen = []

    def first(x):
        seen.append(("mlp0", tuple(x.shape)))
        raise StopForward

    later = {"model.layers.2": lambda x: seen.append(("layer2", None))}
    with trace(model, inputs={"model.layers.0.mlp.down_proj": first, **later}):
        with torch.no_grad():
            forward_until_stopped(model, input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [("mlp0", (1, 3, model.config.intermediate_size))]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_trace_output_rewrites_and_the_layer_runner_matches_the_model(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])
    captured = {}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with trace(model, outputs={"model.layers.0": lambda h: captured.setdefault("h", h)}):
            again = model(input_ids=ids).logits
        with trace(model, outputs={"model.layers.2.mlp": lambda y: torch.zeros_like(y)}):
            zeroed = model(input_ids=ids).logits
        runner = LayerRunner(model, 1, "test", "none")
        causal = torch.ones(4, 4, dtype=torch.bool).tril()[None]
        upper = runner.logits(runner.run(captured["h"], additive_mask(causal, captured["h"].dtype),
                                         torch.arange(4)[None]))
    assert torch.equal(plain, again) and not torch.allclose(plain, zeroed)
    torch.testing.assert_close(upper, plain, atol=1e-5, rtol=1e-4)


def test_a_failure_restores_the_weights_exactly(tiny):
    model, _ = tiny
    weights = {"w": model.model.layers[0].mlp.down_proj.weight}
    before = weights["w"].detach().clone()
    with pytest.raises(RuntimeError):
        with restored_on_failure(weights):
            with torch.no_grad():
                weights["w"].add_(1.0)
            raise RuntimeError("edit failed")
    assert torch.equal(weights["w"], before)
    snapshot = WeightSnapshot(weights, device="cpu")
    with torch.no_grad():
        weights["w"].add_(1.0)
    assert snapshot.changed(weights) == ["w"] and snapshot.change_norms(weights)["w"] > 0
    snapshot.restore(weights)
    assert torch.equal(weights["w"], before) and snapshot.changed(weights) == []
