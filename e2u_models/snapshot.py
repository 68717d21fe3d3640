"""Copies of weights, to put them back exactly when an edit or a training run fails, and to
report what changed; and freezing a model while an engine optimises its own tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch


class WeightSnapshot:
    """Copies of named weights (on their own device, or on ``device``)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], device=None) -> None:
        self.saved = {name: w.detach().clone() if device is None else w.detach().to(device, copy=True)
                      for name, w in weights.items()}

    def restore(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy the saved values back into those of ``weights`` that were saved."""
        with torch.no_grad():
            for name, w in weights.items():
                if name in self.saved:
                    w.copy_(self.saved[name].to(w.device, w.dtype))

    def change_norms(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {name: float((w.detach() - self.saved[name]).float().norm()) for name, w in weights.items()}

    def changed(self, weights: Mapping[str, torch.Tensor]) -> list[str]:
        return [name for name, w in weights.items()
                if name in self.saved and not torch.equal(w.detach().cpu(), self.saved[name])]


@contextlib.contextmanager
def restored_on_failure(weights: Mapping[str, torch.Tensor], device=None):
    """Yields a :class:`WeightSnapshot`; if anything inside fails (NaN, interrupt, error) the
    weights are restored exactly, so a failed edit never leaves a half-edited model behind."""
    snapshot = WeightSnapshot(weights, device)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore(weights)
        raise


@contextlib.contextmanager
def frozen(model):
    """The model's parameters need no gradient inside (an engine optimises its own tensors);
    the ones that needed one do again on exit."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
