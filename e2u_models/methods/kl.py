"""KL: ascend the forget NLL while keeping the output distribution on sampled retain rows close
to the reference model's, L = −NLL(B_f) + w·KL(π_ref ‖ π_θ) on B_r (w = ``kl_weight``, 1 in the
references).

The reference is the model as it was just before unlearning (after ``finetune=`` when given,
not the base model as in PISTOL's code). The KL is summed over the vocabulary and averaged over
the retain batch's real positions (prompt and answer), padding excluded: the references divide by
all B·L positions, so their value depends on the padding length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.training.hparams import RetainHParams
from e2u_models.training.loop import apply_training
from e2u_models.training.losses import logits_of, masked_kl, nll

NAME = "kl"
KIND = "unlearning"
USES_RETAIN = True


@dataclass(frozen=True)
class HyperParams(RetainHParams):
    kl_weight: float = field(default=1.0, metadata={"min": 0})


def apply(model, tokenizer, forget: list[EditRequest], retain: list[EditRequest] | None,
          hparams: HyperParams, *, seed: int = 0, env: MethodEnv) -> MethodReport:
    def loss(network, step, reference):
        forget_nll = nll(network, step.forget)
        kl = masked_kl(logits_of(network, step.retain, all_positions=True), reference.logits(step.retain),
                       step.retain.attention_mask)
        return -forget_nll + hparams.kl_weight * kl, {"forget_nll": forget_nll.item(), "retain_kl": kl.item()}

    return apply_training(NAME, model, tokenizer, forget, list(retain or []), hparams, seed=seed,
                          env=env, loss=loss, needs_reference=True,
                          details={"loss": "-NLL(forget) + kl_weight*KL(ref||model) on retain"})
