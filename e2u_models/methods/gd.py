"""GD, gradient difference: ascend the forget NLL, descend the NLL of sampled retain rows,
L = −γ·NLL(B_f) + α·NLL(B_r) (γ = ``forget_weight``, α = ``retain_weight``, both 1 in the
references). Uniformly drawn retain rows per forget row per step (seeded, as PISTOL/TOFU): one in
the references, ``retain_per_forget`` here."""

from __future__ import annotations

from dataclasses import dataclass, field

from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.training.hparams import RetainHParams
from e2u_models.training.loop import apply_training
from e2u_models.training.losses import nll

NAME = "gd"
KIND = "unlearning"
USES_RETAIN = True

# The two weights share one message (they were checked together).
WEIGHT_RULE = {"min": 0, "message": "hparams forget_weight and retain_weight must be >= 0"}


@dataclass(frozen=True)
class HyperParams(RetainHParams):
    forget_weight: float = field(default=1.0, metadata=WEIGHT_RULE)
    retain_weight: float = field(default=1.0, metadata=WEIGHT_RULE)


def apply(model, tokenizer, forget: list[EditRequest], retain: list[EditRequest] | None,
          hparams: HyperParams, *, seed: int = 0, env: MethodEnv) -> MethodReport:
    def loss(network, step, reference):
        forget_nll, retain_nll = nll(network, step.forget), nll(network, step.retain)
        total = -hparams.forget_weight * forget_nll + hparams.retain_weight * retain_nll
        return total, {"forget_nll": forget_nll.item(), "retain_nll": retain_nll.item()}

    return apply_training(NAME, model, tokenizer, forget, list(retain or []), hparams, seed=seed,
                          env=env, loss=loss,
                          details={"loss": "-forget_weight*NLL(forget) + retain_weight*NLL(retain)"})
