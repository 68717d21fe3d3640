"""The training loop shared by the unlearning baselines (GA, GD, KL, DPO) and the fine-tuning stage.

One loop, many losses: a method supplies a loss function of one step's batches
(:class:`StepBatch`); the loop owns everything else: tokenising question/answer pairs exactly as
the evaluation does (prompt rendered by the evaluation's renderer, answer tokenised in context,
one end-of-turn token supervised, prompt and padding masked with -100 by *position*, never by
token id since SmolLM2 pads with its EOS), seeded shuffling and retain sampling, gradient
accumulation, AdamW with linear warmup/decay, precision (fp32 on CPU; bf16, else fp16 with loss
scaling, autocast on GPU), optional LoRA through peft (merged into the weights afterwards so the
evaluation and the edit cache see plain weights), a progress bar with the loss, and a NaN/inf
guard that names the step and restores the weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from e2u_models.nethook import pad_id_of
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.training.batching import Batch, Example, StepBatch, collate, examples_of
from e2u_models.architectures import direct_layers_fallback, family_of, with_architecture
from e2u_models.training.hparams import TrainHParams
from e2u_models.training.losses import logits_of, sequence_logprob
from e2u_models.snapshot import WeightSnapshot
from e2u_models.training.lower_stack import FrozenLowerStack
from e2u_tasks.errors import E2UError


LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainSetup:
    """Everything a run needs besides the model: examples, how to build a step and its loss."""

    name: str
    forget: list[Example]
    loss: LossFn  # loss(model, step, reference) -> (loss, parts)
    retain: list[Example] | None = None
    needs_reference: bool = False
    # Called before training (model, reference) -> None: e.g. DPO's reference log-probabilities.
    prepare: Callable | None = None
    # Called after each epoch (epoch number, 1-based) -> True to stop early.
    on_epoch_end: Callable[[int], bool] | None = None
    extra_batches: Callable[[list[int], object], dict] | None = None


def _autocast(model, precision: str):
    """(autocast context factory, GradScaler or None, precision actually used)."""
    device = next(model.parameters()).device
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler, precision


def _schedule(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor, warmup


def _adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW as one fused kernel where torch has it (floating-point parameters on CPU or CUDA):
    the same update as the multi-tensor version, several times faster on a CPU."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def layer_index_pattern(model) -> re.Pattern:
    """Matches a parameter name (with a leading dot) of a decoder layer; group 1 = its index."""
    family = family_of(model.config)
    container = re.escape(family.layer_container) if family is not None else r"\.layers"
    return re.compile(container + r"\.(\d+)\.")


def full_trainable(model, from_layer: int) -> list:
    """Parameters of full fine-tuning: all, or (``from_layer`` > 0) the decoder layers from
    ``from_layer`` on and the other non-embedding parameters after them (the final norm)."""
    if not from_layer:
        return list(model.parameters())
    count = model.config.num_hidden_layers
    if from_layer >= count:
        raise E2UError(f"hparam train_from_layer={from_layer} is out of range: the model has "
                       f"{count} layers (0..{count - 1})")
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None}
    trainable = []
    pattern = layer_index_pattern(model)
    for name, p in model.named_parameters():
        layer = pattern.search(f".{name}")
        if (layer is not None and int(layer.group(1)) >= from_layer) or \
                (layer is None and id(p) not in embeddings):
            trainable.append(p)
    return trainable


def _linear_names(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and "." in name}


def _attach_lora(model, hparams: TrainHParams):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in hparams.lora_targets if t not in present]
    if missing:
        raise E2UError(f"hparam lora_targets names modules this model does not have: "
                       f"{', '.join(missing)}; this model's linear modules include "
                       f"{', '.join(sorted(_linear_names(model))[:12])}")
    config = LoraConfig(r=hparams.lora_r, lora_alpha=hparams.lora_alpha,
                        lora_dropout=hparams.lora_dropout, target_modules=list(hparams.lora_targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class _Reference:
    """The frozen model as it was before training: a copy for full fine-tuning, the same network
    with the adapter switched off under LoRA (no copy)."""

    def __init__(self, model, peft_model) -> None:
        self.peft_model = peft_model
        self.copy = None
        if peft_model is None:
            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits at every position (what the KL term compares)."""
        if self.copy is not None:
            return logits_of(self.copy, batch, all_positions=True)
        with self.peft_model.disable_adapter():
            return logits_of(self.peft_model, batch, all_positions=True)

    @torch.no_grad()
    def sequence_logprob(self, batch: Batch) -> torch.Tensor:
        if self.copy is not None:
            return sequence_logprob(self.copy, batch)
        with self.peft_model.disable_adapter():
            return sequence_logprob(self.peft_model, batch)


@dataclass
class _Plan:
    """How long a run is: steps per epoch, total optimizer steps, the learning-rate schedule."""

    steps_per_epoch: int
    total_steps: int
    factor: Callable[[int], float]
    warmup: int

    @classmethod
    def of(cls, examples: int, hparams: TrainHParams) -> _Plan:
        micro_per_epoch = math.ceil(examples / hparams.train_batch_size)
        # A last, shorter accumulation group at the end of an epoch is still one optimizer step.
        steps_per_epoch = math.ceil(micro_per_epoch / hparams.grad_accum_steps)
        total_steps = hparams.max_steps or hparams.epochs * steps_per_epoch
        return cls(steps_per_epoch, total_steps, *_schedule(total_steps, hparams.warmup_ratio))


@dataclass
class _RunState:
    """What a run has done so far (read by the report, also after a failure)."""

    peft_model: object = None
    step: int = 0
    epoch: int = 0
    tokens: int = 0
    stopped_early_at: int | None = None
    losses: list = field(default_factory=list)
    parts_log: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)


@dataclass
class _Loop:
    """The pieces of one optimisation, built by :func:`_set_up`."""

    setup: TrainSetup
    hparams: TrainHParams
    plan: _Plan
    network: object
    reference: _Reference | None
    trainable: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    autocast: Callable
    pad_id: int
    device: torch.device
    order_gen: torch.Generator
    retain_gen: torch.Generator
    progress: object = None


def train(model, tokenizer, setup: TrainSetup, hparams: TrainHParams, *, seed: int,
          log: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place on ``setup``; returns the run's report (steps, losses, seconds).

    Weights are restored exactly if anything fails (NaN/inf loss: an :class:`E2UError` naming
    the step), so a failed run never leaves a half-trained model behind.
    """
    if not setup.forget:
        raise E2UError(f"{setup.name}: nothing to train on (the forget set is empty)")
    hparams = with_architecture(hparams, model)
    if setup.retain is not None and not setup.retain:
        raise E2UError(f"{setup.name} needs retain rows, but the retain split is empty")
    autocast, scaler, precision = _autocast(model, hparams.precision)
    plan = _Plan.of(len(setup.forget), hparams)
    snapshot = WeightSnapshot(dict(model.named_parameters()), device="cpu")
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = _RunState()
    started = time.perf_counter()
    try:
        loop = _set_up(model, tokenizer, setup, hparams, seed, plan, state, autocast, scaler)
        for fallback in state.fallbacks:
            log(f"e2u: {fallback}")
        _run(loop, state)
        if state.peft_model is not None:
            state.peft_model.merge_and_unload()
            state.peft_model = None
    except BaseException:
        if state.peft_model is not None:
            with contextlib.suppress(Exception):
                state.peft_model.unload()
        snapshot.restore(dict(model.named_parameters()))
        raise
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, False))
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    changed = snapshot.changed(dict(model.named_parameters()))
    log(f"e2u: {setup.name} trained {state.step} optimizer steps ({state.epoch} epochs) in {seconds:.1f} s, "
        f"final loss {state.losses[-1] if state.losses else float('nan'):.4f}")
    return _report(model, setup, hparams, plan, state, precision, seconds, changed)


def _set_up(model, tokenizer, setup: TrainSetup, hparams: TrainHParams, seed: int, plan: _Plan,
            state: _RunState, autocast, scaler) -> _Loop:
    """The trained parameters (LoRA adapter, or full with ``train_from_layer``), the reference
    model, the network the loss runs (a :class:`FrozenLowerStack` above a frozen lower part),
    the optimizer and scheduler, and the seeded generators of the example order and retain draws."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    if hparams.lora:
        state.peft_model = _attach_lora(model, hparams)
        trainable = [p for p in state.peft_model.parameters() if p.requires_grad]
    else:
        trainable = full_trainable(model, hparams.train_from_layer)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    reference = _Reference(model, state.peft_model) if setup.needs_reference else None
    network = state.peft_model if state.peft_model is not None else model
    fallback = direct_layers_fallback(model) if hparams.train_from_layer else None
    if fallback is not None:  # the frozen layers run in every step; the gradients are the same
        state.fallbacks.append(f"train_from_layer: {fallback}")
    elif hparams.train_from_layer and state.peft_model is None:
        network = FrozenLowerStack(model, hparams.train_from_layer, pad_id)
        network.precompute(setup.forget + (setup.retain or []))
    if setup.prepare is not None:
        network.eval()
        setup.prepare(network, reference)
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = _adamw([{"params": decay, "weight_decay": hparams.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}], hparams.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
    order_gen = torch.Generator().manual_seed(seed)
    retain_gen = torch.Generator().manual_seed(seed + 1_000_003)
    return _Loop(setup, hparams, plan, network, reference, trainable, optimizer, scheduler, scaler,
                 autocast, pad_id, device, order_gen, retain_gen)


def _run(loop: _Loop, state: _RunState) -> None:
    """Epochs until the planned optimizer steps are done or ``on_epoch_end`` stops the run."""
    setup, network = loop.setup, loop.network
    network.train()
    loop.progress = tqdm(total=loop.plan.total_steps, desc=f"{setup.name} training", leave=False)
    while state.step < loop.plan.total_steps:
        state.epoch += 1
        _epoch(loop, state)
        if setup.on_epoch_end is not None:
            network.eval()
            stop = setup.on_epoch_end(state.epoch)
            network.train()
            if stop:
                state.stopped_early_at = state.epoch
                break
    loop.progress.close()


def _epoch(loop: _Loop, state: _RunState) -> None:
    """One pass over the forget examples in a seeded order, ``grad_accum_steps`` micro-batches
    per optimizer step."""
    hparams, setup, batch_size = loop.hparams, loop.setup, loop.hparams.train_batch_size
    order = torch.randperm(len(setup.forget), generator=loop.order_gen).tolist()
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    micro = 0
    for chunk in chunks:
        loss, parts = _backward(loop, state, chunk)
        micro += 1
        if micro % hparams.grad_accum_steps and micro != len(chunks):
            continue
        _optimizer_step(loop)
        state.step += 1
        state.losses.append(round(loss.item(), 5))
        state.parts_log.append({k: round(v, 5) for k, v in parts.items()})
        loop.progress.update(1)
        loop.progress.set_postfix(loss=f"{state.losses[-1]:.4f}", epoch=state.epoch)
        if state.step >= loop.plan.total_steps:
            break


def _backward(loop: _Loop, state: _RunState, chunk: list[int]):
    """The loss of one micro-batch (these forget examples, ``retain_per_forget`` retain draws per
    forget example), backpropagated."""
    setup, hparams = loop.setup, loop.hparams
    batch = collate([setup.forget[i] for i in chunk], loop.pad_id, loop.device)
    retain = None
    if setup.retain is not None:
        draws = len(chunk) * hparams.retain_per_forget
        picks = torch.randint(len(setup.retain), (draws,), generator=loop.retain_gen).tolist()
        retain = collate([setup.retain[i] for i in picks], loop.pad_id, loop.device)
    extra = setup.extra_batches(chunk, loop.device) if setup.extra_batches else {}
    micro_step = StepBatch(forget=batch, forget_indices=chunk, retain=retain, extra=extra)
    with loop.autocast():
        loss, parts = setup.loss(loop.network, micro_step, loop.reference)
    if not torch.isfinite(loss):
        raise E2UError(f"{setup.name}: the loss became {loss.item()} at optimizer step "
                       f"{state.step + 1}/{loop.plan.total_steps} (epoch {state.epoch}); lower lr (now "
                       f"{hparams.lr}) or use precision=fp32; weights restored")
    scaled = loss / hparams.grad_accum_steps
    (loop.scaler.scale(scaled) if loop.scaler else scaled).backward()
    state.tokens += batch.tokens + (retain.tokens if retain is not None else 0)
    return loss, parts


def _optimizer_step(loop: _Loop) -> None:
    scaler, optimizer = loop.scaler, loop.optimizer
    if scaler:
        scaler.unscale_(optimizer)
    if loop.hparams.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(loop.trainable, loop.hparams.max_grad_norm)
    (scaler.step(optimizer) if scaler else optimizer.step())
    if scaler:
        scaler.update()
    loop.scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _report(model, setup: TrainSetup, hparams: TrainHParams, plan: _Plan, state: _RunState, precision: str,
            seconds: float, changed: list[str]) -> dict:
    losses, parts_log, tokens = state.losses, state.parts_log, state.tokens
    return {
        "optimizer_steps": state.step, "epochs_run": state.epoch, "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps": plan.warmup, "stopped_early_at_epoch": state.stopped_early_at,
        "precision": precision, "lora": hparams.lora, "forget_examples": len(setup.forget),
        "retain_examples": len(setup.retain) if setup.retain is not None else 0,
        "reference_model": "the model just before training (frozen)" if setup.needs_reference else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "losses": losses, "loss_parts_last": parts_log[-1] if parts_log else {},
        "train_seconds": round(seconds, 2), "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "changed_parameters": changed,
        "architecture": {"model_type": getattr(model.config, "model_type", None),
                         "family": family.name if (family := family_of(model.config)) else None,
                         "fallbacks": list(state.fallbacks)},
    }


def apply_training(name: str, model, tokenizer, forget: Sequence[EditRequest],
                   retain: Sequence[EditRequest] | None, hparams: TrainHParams, *, seed: int,
                   env: MethodEnv, loss: LossFn, needs_reference: bool = False,
                   prepare=None, extra_batches=None, details: dict | None = None):
    """Run one unlearning method: forget (and retain) requests to examples, train, report."""
    setup = TrainSetup(name=name, forget=examples_of(tokenizer, env, forget, hparams), loss=loss,
                       retain=examples_of(tokenizer, env, retain, hparams) if retain is not None else None,
                       needs_reference=needs_reference, prepare=prepare, extra_batches=extra_batches)
    run = train(model, tokenizer, setup, hparams, seed=seed, log=env.log)
    changed = run.pop("changed_parameters")
    return MethodReport(method=name, changed_parameters=changed,
                        details={**run, **(details or {}),
                                 "retain_sampling": ({"seed": seed, "per_forget_example": hparams.retain_per_forget,
                                                      "with_replacement": True}
                                                     if retain is not None else None)})
