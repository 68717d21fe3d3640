"""``method=none``: evaluate the model as it is (the baseline every method is compared with)."""

from __future__ import annotations

from dataclasses import dataclass

from e2u_models.protocol import EditRequest, MethodReport

NAME = "none"
KIND = "none"
USES_RETAIN = False


@dataclass(frozen=True)
class HyperParams:
    """No hyperparameters."""


def apply(model, tokenizer, forget: list[EditRequest], retain: list[EditRequest] | None,
          hparams: HyperParams, *, seed: int = 0, env=None) -> MethodReport:
    return MethodReport(method=NAME, details={"forget_requests": len(forget)})
