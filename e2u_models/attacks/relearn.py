"""``attack=relearn``: a few fine-tuning steps on a little data after the method (Hu et al.,
"Jogging the memory of unlearned LLMs through targeted relearning", 2024).

If a few steps on *half* of the forget rows bring back the answers of the *other* half, the method
hid the knowledge rather than removing it. ``attack_data=forget_half`` relearns the half the split
spec sets aside (:class:`~e2u_tasks.splits.Splits`, ``relearn``), and the forget and rephrase
tasks evaluate the other half; ``attack_data=retain`` relearns the retain rows (unrelated
knowledge: the answers come back through it only if they were hidden, not erased; the retain
task then evaluates rows the attack trained on).

The steps are the shared training loop's (:mod:`e2u_models.training.loop`): the answer tokens'
cross-entropy after the evaluation's prompt, AdamW with linear warmup/decay, seeded order,
``attack_steps`` optimizer steps of ``train_batch_size`` rows. Full fine-tuning by default (every
weight may move, the strongest attack of this size); ``attack_lora=true`` trains a LoRA adapter
instead, merged into the weights afterwards. GRACE codebooks and WISE side memories stay attached
and act during the steps but are not trained (they are not parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

from e2u_models.protocol import EditRequest, MethodEnv
from e2u_models.training.batching import examples_of
from e2u_models.training.hparams import TrainHParams
from e2u_models.training.loop import TrainSetup, train
from e2u_models.training.losses import nll


def relearn_hparams(steps: int, lr: float, lora: bool) -> TrainHParams:
    """The loop's settings: ``steps`` optimizer steps at ``lr``, the loop's other defaults."""
    hparams = TrainHParams(lr=lr, max_steps=steps, lora=lora)
    hparams.validate()
    return hparams


def relearn(model, tokenizer, requests: Sequence[EditRequest], hparams: TrainHParams, *,
            seed: int, env: MethodEnv) -> dict:
    """Train ``model`` in place on ``requests``; the loop's report."""
    setup = TrainSetup(name="relearn attack", forget=examples_of(tokenizer, env, requests, hparams),
                       loss=lambda network, step, reference: (nll(network, step.forget), {}))
    report = train(model, tokenizer, setup, hparams, seed=seed, log=env.log)
    model.eval()
    return report
