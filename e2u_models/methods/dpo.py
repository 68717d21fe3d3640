"""DPO with refusals: prefer the forget row's refusal y_w over its true answer y_l,
L = −mean log σ(β·Δ), Δ = [S(q,y_w;θ) − S(q,y_l;θ)] − [S(q,y_w;ref) − S(q,y_l;ref)],
S = summed log-probability of the answer tokens (+ EOS), β = ``beta`` (0.1 in the references).

The scale is PISTOL's/TOFU's (−1·mean), not open-unlearning's −2/β. The refusal y_w is the
forget request's target, drawn by :mod:`e2u_models.targets` exactly as for the editors (same
``target=``/``refusal_file=``/seed), so DPO and editing unlearn towards the same sentences. The
reference is the model just before unlearning; its log-probabilities of the fixed (y_w, y_l)
pairs are computed once before training, so no copy of the model is kept.

``retain_weight`` α adds open-unlearning's retain term, L + α·NLL(B_r), B_r drawn from the retain
split as GD draws it (``retain_per_forget`` rows per forget row). α = 0 (the default) is PISTOL's
DPO, which has no retain term and then never reads the retain split; open-unlearning uses α = 1.
Without it, DPO towards refusals teaches the model to refuse every question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.nethook import pad_id_of
from e2u_models.training.hparams import RetainHParams
from e2u_models.training.loop import apply_training
from e2u_models.training.batching import collate, examples_of
from e2u_models.training.losses import nll, sequence_logprob
from e2u_tasks.errors import E2UError

NAME = "dpo"
KIND = "unlearning"
USES_RETAIN = False  # with retain_weight > 0 it does: see uses_retain


@dataclass(frozen=True)
class HyperParams(RetainHParams):
    beta: float = field(default=0.1, metadata={"above": 0, "hint": "e.g. beta=0.1"})
    retain_weight: float = field(default=0.0, metadata={"min": 0})


def uses_retain(hparams: HyperParams) -> bool:
    """Whether this run reads the retain split (only through the optional retain term)."""
    return hparams.retain_weight > 0


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    missing = [r.index for r in forget if not r.target]
    if missing:
        raise E2UError(f"dpo needs a refusal target for every forget row; rows {missing[:5]} have none")
    preferred = examples_of(tokenizer, env, forget, hparams, answer_of=lambda r: r.target)
    pad = pad_id_of(tokenizer)
    reference_scores: dict[str, torch.Tensor] = {}

    def preferred_batch(chunk, device):
        return {"preferred": collate([preferred[i] for i in chunk], pad, device)}

    def prepare(network, reference):
        """S(q, y_w; ref) and S(q, y_l; ref) of every forget row, once, before any update."""
        rejected = examples_of(tokenizer, env, forget, hparams)
        device = next(network.parameters()).device
        with torch.no_grad():
            for key, examples in (("preferred", preferred), ("rejected", rejected)):
                scores = [sequence_logprob(network, collate(examples[i:i + 16], pad, device))
                          for i in range(0, len(examples), 16)]
                reference_scores[key] = torch.cat(scores).float()

    def loss(network, step, reference):
        index = torch.tensor(step.forget_indices)
        chosen = sequence_logprob(network, step.extra["preferred"])
        rejected = sequence_logprob(network, step.forget)
        ref_chosen = reference_scores["preferred"][index].to(chosen.device)
        ref_rejected = reference_scores["rejected"][index].to(chosen.device)
        margin = (chosen - rejected) - (ref_chosen - ref_rejected)
        value = -F.logsigmoid(hparams.beta * margin).mean()
        logged = {"margin": margin.mean().item(), "preference_accuracy": (margin > 0).float().mean().item(),
                  "preference_loss": value.item()}
        if step.retain is not None:
            retain_nll = nll(network, step.retain)
            value = value + hparams.retain_weight * retain_nll
            logged["retain_nll"] = retain_nll.item()
        return value, logged

    with_retain = uses_retain(hparams)
    if with_retain and not retain:
        raise E2UError("dpo with retain_weight > 0 needs retain rows, but none were given")
    return apply_training(NAME, model, tokenizer, forget, list(retain) if with_retain else None, hparams,
                          seed=seed, env=env, loss=loss, prepare=prepare, extra_batches=preferred_batch,
                          details={"loss": "-mean log sigmoid(beta*margin) (PISTOL/TOFU scale)"
                                           + (" + retain_weight*NLL(retain)" if with_retain else ""),
                                   "preferred": "the forget row's refusal target",
                                   "rejected": "the true answer",
                                   "reference_model": "the model just before unlearning "
                                                      "(its log-probabilities computed once)"})
