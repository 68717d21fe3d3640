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
import importlib.util
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from e2u_models.protocol import EditRequest, MethodEnv
from e2u_models.editing.locate import pad_id_of, target_token_ids
from e2u_models.shared_prefix import FixedPrefixKV, RecordingKV, cache_keyword, common_prefix_length
from e2u_tasks.errors import E2UError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100
# Batches with more tokens (after the shared prefix) than this run left-padded instead of packed:
# the packed sequence's attention costs (total tokens)², the padded batch's rows × length².
PACKED_TOKEN_LIMIT = 4096


@dataclass(frozen=True)
class TrainHParams:
    """Optimisation settings shared by every training-based method (names avoid the model args
    ``batch_size``/``max_length``, which they would shadow)."""

    lr: float = 1e-5
    epochs: int = 20
    # Optimizer steps; 0 = as many as ``epochs`` passes over the forget set give.
    max_steps: int = 0
    train_batch_size: int = 4
    grad_accum_steps: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # auto: fp32 on CPU; on GPU bf16 autocast (fp16 with loss scaling where bf16 is unsupported).
    precision: str = "auto"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    max_train_length: int = 512
    # 0: every parameter trains. k > 0: only decoder layers k.. and the final norm (embeddings and
    # head frozen), so the backward pass stops at layer k: fewer FLOPs per step on a CPU.
    train_from_layer: int = 0

    def validate(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise E2UError(f"hparam lr={self.lr} must be > 0 (e.g. lr=1e-5)")
        for name in ("epochs", "train_batch_size", "grad_accum_steps", "max_train_length"):
            if getattr(self, name) < 1:
                raise E2UError(f"hparam {name}={getattr(self, name)} must be >= 1")
        if self.train_from_layer < 0:
            raise E2UError(f"hparam train_from_layer={self.train_from_layer} must be >= 0 (0 = every layer)")
        if self.train_from_layer and self.lora:
            raise E2UError("hparam train_from_layer applies to full fine-tuning; with lora=true choose "
                           "the adapted modules with lora_targets")
        if self.max_steps < 0:
            raise E2UError(f"hparam max_steps={self.max_steps} must be >= 0 (0 = from epochs)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise E2UError(f"hparam warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise E2UError("hparams weight_decay and max_grad_norm must be >= 0 (0 = no clipping)")
        if self.precision not in PRECISIONS:
            raise E2UError(f"hparam precision={self.precision!r} is not accepted; use one of "
                           f"{', '.join(PRECISIONS)}")
        if self.lora:
            if importlib.util.find_spec("peft") is None:
                raise E2UError("lora=true needs the peft package, which is not installed; "
                               "pip install 'e2u[lora]' (or peft), or use lora=false")
            if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
                raise E2UError(f"hparams lora_r={self.lora_r} (>= 1), lora_alpha={self.lora_alpha} "
                               f"(> 0), lora_dropout={self.lora_dropout} ([0, 1)) out of range")
            if not self.lora_targets:
                raise E2UError("hparam lora_targets=[] is empty; name the linear modules to adapt")


    def check_model(self, config) -> None:
        """Nothing to check in the config; defining it makes the model pick the preset matching
        the config (``hparams/<method>/*.yaml``) before the weights are loaded."""


# --------------------------------------------------------------------------- examples and batches


@dataclass(frozen=True)
class Example:
    """One supervised sequence: prompt + answer + EOS, with labels on the answer and EOS only."""

    index: int
    ids: tuple[int, ...]
    prompt_length: int


def encode_example(tokenizer, env: MethodEnv, index: int, prompt: str, answer: str,
                   max_length: int) -> Example:
    """``prompt`` (already rendered as the evaluation renders it) followed by ``answer`` tokenised
    in context exactly as the evaluation scores it, plus one EOS (so the model learns to stop)."""
    prompt_ids = list(env.encode(prompt))
    answer_ids = list(target_token_ids(env, tokenizer, prompt_ids, prompt, answer, with_eos=True))
    ids = prompt_ids + answer_ids
    if len(ids) > max_length:  # keep the answer, cut the prompt from the left
        keep = max_length - len(answer_ids)
        if keep < 1:
            raise E2UError(f"row {index}: the answer alone is longer than max_train_length={max_length}")
        ids = prompt_ids[-keep:] + answer_ids
        prompt_ids = prompt_ids[-keep:]
    return Example(index=index, ids=tuple(ids), prompt_length=len(prompt_ids))


def examples_of(tokenizer, env: MethodEnv, requests: Sequence[EditRequest], hparams: TrainHParams,
                answer_of: Callable[[EditRequest], str] = lambda r: r.answer) -> list[Example]:
    return [encode_example(tokenizer, env, r.index, r.prompt, answer_of(r), hparams.max_train_length)
            for r in requests]


@dataclass
class Batch:
    """*Left*-padded ids, attention mask, position ids and labels (-100 on prompt and padding, by
    position). Left padding puts every row's answer at the end, so the vocabulary head runs only
    on the last ``keep`` positions (the longest answer + 1) instead of the whole sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    keep: int

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[Example], pad_id: int, device) -> Batch:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        start = width - len(example.ids)
        ids[row, start:] = torch.tensor(example.ids)
        mask[row, start:] = 1
        labels[row, start + example.prompt_length:] = ids[row, start + example.prompt_length:]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = min(width, 1 + max(len(e.ids) - e.prompt_length for e in examples))
    return Batch(ids.to(device), mask.to(device), labels.to(device), positions.to(device), keep)


@dataclass
class StepBatch:
    """What one micro-step's loss sees. ``forget_indices`` are positions in the forget list (DPO
    looks up its precomputed reference log-probabilities by them)."""

    forget: Batch
    forget_indices: list[int]
    retain: Batch | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- loss building blocks


def logits_of(model, batch: Batch, all_positions: bool = False) -> torch.Tensor:
    """Logits of the last ``batch.keep`` positions (every position with ``all_positions``)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids,
                 logits_to_keep=0 if all_positions else batch.keep).logits


def token_logprobs(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every label token (shifted) and the label mask, ``[B, positions-1]``;
    ``logits`` cover the last positions of the batch (see :func:`logits_of`)."""
    labels = batch.labels[:, -logits.shape[1]:][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def nll(model, batch: Batch) -> torch.Tensor:
    """Token-mean cross-entropy over all label tokens of the batch (HF's ``outputs.loss``)."""
    picked, mask = token_logprobs(logits_of(model, batch), batch)
    return -picked.sum() / mask.sum().clamp(min=1)


def sequence_logprob(model, batch: Batch) -> torch.Tensor:
    """S(q, a): the summed log-probability of each sequence's label tokens, ``[B]``."""
    picked, _ = token_logprobs(logits_of(model, batch), batch)
    return picked.sum(-1)


def masked_kl(current_logits: torch.Tensor, reference_logits: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) summed over the vocabulary, averaged over the *real* positions (prompt
    and answer; padding excluded, unlike the references, whose value depends on padding)."""
    current = torch.log_softmax(current_logits.float(), dim=-1)
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    per_position = (reference.exp() * (reference - current)).sum(-1)
    mask = attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------- the loop


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
    the same update, ~6x faster than the multi-tensor version for SmolLM2's 50M trained
    parameters on a CPU core (0.11 s against 0.65 s a step), which is a fifth of a small step."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _full_trainable(model, from_layer: int) -> list:
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
    for name, p in model.named_parameters():
        layer = _LAYER_INDEX.search(f".{name}")
        if (layer is not None and int(layer.group(1)) >= from_layer) or \
                (layer is None and id(p) not in embeddings):
            trainable.append(p)
    return trainable


class FrozenLowerStack(torch.nn.Module):
    """The model with its frozen lower layers replaced by a cache of their output.

    With ``train_from_layer=k`` nothing below layer k changes during training, so the residual
    entering layer k is a fixed function of each sequence: one no-grad pass computes it for every
    example (:meth:`precompute`) and every step then runs only layers k.. on it. Called
    like the model (``input_ids``, ``attention_mask``, ``position_ids``, ``logits_to_keep``) on
    left-padded batches; it returns an object with ``.logits``. When only the last positions'
    logits are asked for (the losses' case), the tokens every row starts with run once and the
    rest runs packed, without padding."""

    def __init__(self, model, from_layer: int, pad_id: int, share_prefix: bool = True) -> None:
        super().__init__()
        base = model.base_model
        if not all(hasattr(base, name) for name in ("layers", "norm", "rotary_emb")):
            raise E2UError("train_from_layer needs a llama-style decoder (layers, norm, rotary_emb); "
                           "use train_from_layer=0 for this architecture")
        self.model, self.base, self.from_layer, self.pad_id = model, base, from_layer, pad_id
        self.share_prefix = share_prefix  # False: the plain left-padded pass (benchmarks compare)
        self.upper = list(base.layers)[from_layer:]
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def precompute(self, examples: Sequence[Example], batch_size: int = 16) -> None:
        """Cache the states of these examples in left-padded batches (one pass, not one per row)."""
        device = next(self.model.parameters()).device
        todo = [e for e in {e.ids: e for e in examples}.values() if e.ids not in self.states]
        captured = {}

        def capture(module, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Reached

        handle = self.upper[0].register_forward_pre_hook(capture, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                batch = collate(chunk, self.pad_id, device)
                try:
                    self.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids)
                except _Reached:
                    pass
                for row, example in enumerate(chunk):
                    self.states[example.ids] = captured["h"][row, -len(example.ids):].clone()
        finally:
            handle.remove()
            self.model.train(was_training)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        rows, width = input_ids.shape
        sequences = [tuple(input_ids[row, width - int(attention_mask[row].sum()):].tolist())
                     for row in range(rows)]
        # Sequences not precomputed (e.g. DPO's preferred answers) are computed on first sight.
        self.precompute([Example(-1, ids, 0) for ids in sequences if ids not in self.states])
        shared = 0
        if self.share_prefix and logits_to_keep and rows > 1:
            shared = common_prefix_length(sequences, keep=logits_to_keep)
            if sum(len(ids) for ids in sequences) - rows * shared > PACKED_TOKEN_LIMIT:
                shared = 0  # packed attention grows with the square of the batch's tokens
        if shared:
            hidden = self._run_after_shared_prefix(sequences, shared, logits_to_keep)
        else:
            hidden = self._run_left_padded(sequences, width, attention_mask, position_ids)
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        return _Logits(self.model.get_output_embeddings()(self.base.norm(hidden)))

    def _layers(self, hidden, mask, positions, cache=None):
        embeddings = self.base.rotary_emb(hidden, positions)
        extra = {} if cache is None else {cache_keyword(self.upper[0]): cache, "use_cache": True}
        for layer in self.upper:
            out = layer(hidden, attention_mask=mask, position_ids=positions,
                        position_embeddings=embeddings, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def _run_left_padded(self, sequences, width, attention_mask, position_ids):
        """Every row's full sequence, left-padded as the batch is."""
        device = attention_mask.device
        hidden = torch.zeros((len(sequences), width, self.base.config.hidden_size), device=device,
                             dtype=next(self.base.parameters()).dtype)
        for row, ids in enumerate(sequences):
            hidden[row, width - len(ids):] = self.states[ids]
        allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] \
            & attention_mask[:, None, :].bool()
        return self._layers(hidden, self._additive(allowed, hidden.dtype), position_ids)

    def _run_after_shared_prefix(self, sequences, shared: int, keep: int):
        """The last ``keep`` positions of every row, ``[rows, keep, d]``, computed without padding.

        The tokens all rows share (the chat template's system prompt and user header: a third to
        a half of a short QA sequence) run once; then the rows' own tokens run packed into one
        sequence, each token attending to the shared keys/values (gradients flow through them) and
        to the earlier tokens of its own row, at its own position."""
        first = self.states[sequences[0]]
        device, dtype = first.device, first.dtype
        record = RecordingKV()
        causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()[None]
        self._layers(first[None, :shared], self._additive(causal, dtype),
                     torch.arange(shared, device=device)[None], record)
        lengths = [len(ids) - shared for ids in sequences]
        packed = torch.cat([self.states[ids][shared:] for ids in sequences])[None]
        row_of = torch.repeat_interleave(torch.arange(len(sequences), device=device),
                                         torch.tensor(lengths, device=device))
        positions = torch.cat([torch.arange(shared, len(ids), device=device) for ids in sequences])[None]
        total = packed.shape[1]
        own_row = (row_of[:, None] == row_of[None, :]) & torch.ones(total, total, dtype=torch.bool,
                                                                    device=device).tril()
        allowed = torch.cat([torch.ones((total, shared), dtype=torch.bool, device=device), own_row], dim=1)
        hidden = self._layers(packed, self._additive(allowed[None], dtype), positions,
                              FixedPrefixKV(record.layers))
        ends = torch.tensor(lengths, device=device).cumsum(0)
        tail = ends[:, None] - keep + torch.arange(keep, device=device)[None]
        return hidden[0, tail]


class _Reached(Exception):
    """Stops the lower-layer pass once the cached layer's input is captured."""


@dataclass
class _Logits:
    logits: torch.Tensor


def _attach_lora(model, hparams: TrainHParams):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in hparams.lora_targets if t not in present]
    if missing:
        raise E2UError(f"hparam lora_targets names modules this model does not have: "
                       f"{', '.join(missing)}; e.g. {', '.join(LLAMA_PROJECTIONS)}")
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


def train(model, tokenizer, setup: TrainSetup, hparams: TrainHParams, *, seed: int,
          log: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place on ``setup``; returns the run's report (steps, losses, seconds).

    Weights are restored exactly if anything fails (NaN/inf loss: an :class:`E2UError` naming
    the step), so a failed run never leaves a half-trained model behind.
    """
    if not setup.forget:
        raise E2UError(f"{setup.name}: nothing to train on (the forget set is empty)")
    if setup.retain is not None and not setup.retain:
        raise E2UError(f"{setup.name} needs retain rows, but the retain split is empty")
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    autocast, scaler, precision = _autocast(model, hparams.precision)
    batch_size = hparams.train_batch_size
    micro_per_epoch = math.ceil(len(setup.forget) / batch_size)
    # A last, shorter accumulation group at the end of an epoch is still one optimizer step.
    steps_per_epoch = math.ceil(micro_per_epoch / hparams.grad_accum_steps)
    total_steps = hparams.max_steps or hparams.epochs * steps_per_epoch
    factor, warmup = _schedule(total_steps, hparams.warmup_ratio)

    candidates = {n: p for n, p in model.named_parameters()}
    saved = {n: p.detach().to("cpu", copy=True) for n, p in candidates.items()}
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = None
    started = time.perf_counter()
    losses: list[float] = []
    parts_log: list[dict[str, float]] = []
    tokens = 0
    step = 0
    stopped_early_at = None
    try:
        if hparams.lora:
            peft_model = _attach_lora(model, hparams)
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
        else:
            trainable = _full_trainable(model, hparams.train_from_layer)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)
        reference = _Reference(model, peft_model) if setup.needs_reference else None
        network = peft_model if peft_model is not None else model
        if hparams.train_from_layer and peft_model is None:
            network = FrozenLowerStack(model, hparams.train_from_layer, pad_id)
            network.precompute(setup.forget + (setup.retain or []))
        if setup.prepare is not None:
            network.eval()
            setup.prepare(network, reference)
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        optimizer = _adamw([{"params": decay, "weight_decay": hparams.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], hparams.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        order_gen = torch.Generator().manual_seed(seed)
        retain_gen = torch.Generator().manual_seed(seed + 1_000_003)
        network.train()
        progress = tqdm(total=total_steps, desc=f"{setup.name} training", leave=False)
        epoch = 0
        while step < total_steps:
            epoch += 1
            order = torch.randperm(len(setup.forget), generator=order_gen).tolist()
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            micro = 0
            for chunk in chunks:
                batch = collate([setup.forget[i] for i in chunk], pad_id, device)
                retain = None
                if setup.retain is not None:
                    picks = torch.randint(len(setup.retain), (len(chunk),), generator=retain_gen).tolist()
                    retain = collate([setup.retain[i] for i in picks], pad_id, device)
                extra = setup.extra_batches(chunk, device) if setup.extra_batches else {}
                micro_step = StepBatch(forget=batch, forget_indices=chunk, retain=retain, extra=extra)
                with autocast():
                    loss, parts = setup.loss(network, micro_step, reference)
                if not torch.isfinite(loss):
                    raise E2UError(f"{setup.name}: the loss became {loss.item()} at optimizer step "
                                   f"{step + 1}/{total_steps} (epoch {epoch}); lower lr (now "
                                   f"{hparams.lr}) or use precision=fp32; weights restored")
                scaled = loss / hparams.grad_accum_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
                tokens += batch.tokens + (retain.tokens if retain is not None else 0)
                micro += 1
                if micro % hparams.grad_accum_steps and micro != len(chunks):
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                if hparams.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, hparams.max_grad_norm)
                (scaler.step(optimizer) if scaler else optimizer.step())
                if scaler:
                    scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(round(loss.item(), 5))
                parts_log.append({k: round(v, 5) for k, v in parts.items()})
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch)
                if step >= total_steps:
                    break
            if setup.on_epoch_end is not None:
                network.eval()
                stop = setup.on_epoch_end(epoch)
                network.train()
                if stop:
                    stopped_early_at = epoch
                    break
        progress.close()
        if peft_model is not None:
            peft_model.merge_and_unload()
            peft_model = None
    except BaseException:
        if peft_model is not None:
            with contextlib.suppress(Exception):
                peft_model.unload()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name].to(p.device, p.dtype))
        raise
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, False))
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    changed = [n for n, p in model.named_parameters()
               if n in saved and not torch.equal(p.detach().cpu(), saved[n])]
    log(f"e2u: {setup.name} trained {step} optimizer steps ({epoch} epochs) in {seconds:.1f} s, "
        f"final loss {losses[-1] if losses else float('nan'):.4f}")
    return {
        "optimizer_steps": step, "epochs_run": epoch, "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup, "stopped_early_at_epoch": stopped_early_at,
        "precision": precision, "lora": hparams.lora, "forget_examples": len(setup.forget),
        "retain_examples": len(setup.retain) if setup.retain is not None else 0,
        "reference_model": "the model just before training (frozen)" if setup.needs_reference else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "losses": losses, "loss_parts_last": parts_log[-1] if parts_log else {},
        "train_seconds": round(seconds, 2), "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "changed_parameters": changed,
    }


def apply_training(name: str, model, tokenizer, forget: Sequence[EditRequest],
                   retain: Sequence[EditRequest] | None, hparams: TrainHParams, *, seed: int,
                   env: MethodEnv, loss: LossFn, needs_reference: bool = False,
                   prepare=None, extra_batches=None, details: dict | None = None):
    """Run one unlearning method: forget (and retain) requests to examples, train, report."""
    from e2u_models.protocol import MethodReport

    setup = TrainSetup(name=name, forget=examples_of(tokenizer, env, forget, hparams), loss=loss,
                       retain=examples_of(tokenizer, env, retain, hparams) if retain is not None else None,
                       needs_reference=needs_reference, prepare=prepare, extra_batches=extra_batches)
    run = train(model, tokenizer, setup, hparams, seed=seed, log=env.log)
    changed = run.pop("changed_parameters")
    return MethodReport(method=name, changed_parameters=changed,
                        details={**run, **(details or {}),
                                 "retain_sampling": ({"seed": seed, "per_forget_example": 1,
                                                      "with_replacement": True}
                                                     if retain is not None else None)})
