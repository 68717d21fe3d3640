"""GA, gradient ascent: maximise the NLL of the forget answers, L = −NLL(B_f).

No retain term and no reference model, so nothing holds the rest of the model in place: GA
collapses with enough steps (report the fixed step budget, not a best checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.training.hparams import TrainHParams
from e2u_models.training.loop import apply_training
from e2u_models.training.losses import nll

NAME = "ga"
KIND = "unlearning"
USES_RETAIN = False


@dataclass(frozen=True)
class HyperParams(TrainHParams):
    pass


def loss(model, step, reference):
    forget_nll = nll(model, step.forget)
    return -forget_nll, {"forget_nll": forget_nll.item()}


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    return apply_training(NAME, model, tokenizer, forget, None, hparams, seed=seed, env=env,
                          loss=loss, details={"loss": "-NLL(forget)"})
