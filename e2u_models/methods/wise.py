"""WISE: a side memory (a trainable copy W' = W + D of one MLP output projection) and a router.

Training, per shard of ``save_freq`` edits (one shard for TOFU/PISTOL sizes), on the edit rows
(prompt + target, labels on the target) and ``irrelevant_per_edit`` *irrelevant* prompts per edit
(e2u's own questions, ``irrelevant_set`` generic or factual, or ``irrelevant_file``; never the
retain split, which the paper notes would be unfair to the other methods), optionally followed by
the unedited model's own greedy answer (``irrelevant_answer_tokens``), as WISE's rows carry answers:

    dist(x) = ‖act(W'x) − act(Wx)‖₂  per token (act = the model's hidden activation)
    L = ce_scale · CE(target | side memory on from the key token on)
        + mean₊(out − α) + mean₊(β − in) + mean₊(out − in + γ)

with [α, β, γ] = ``act_margin``, "in" the distances at the edit rows' tokens from the key (the
prompt's last token) on, "out" those at the irrelevant prompts' tokens and the edit prompts'
tokens before the key, the third term over every (out, in) pair as WISE pairs loc and edit rows,
and mean₊ the mean over the violated (positive) entries only (EasyEdit's averaging; with
``margin_mean=all`` the mean of max(0, ·) over all entries, as the paper's equation averages its
hinges: continuous where mean₊ jumps whenever an entry crosses its margin, which makes training
more sensitive to float noise, see ``benchmarks/wise_sensitivity.py``). With ``edit_positions=key`` (e2u's
option) an edit's one in-scope token is its key (``fact_token``, e.g. the question's entity) and
the side memory writes only there in the CE; every other token of the edit rows is out of scope.
SGD (``edit_lr``, weight decay 1e-5; Adam with ``optimizer=adam``) on D, gradients multiplied by a random Bernoulli(``mask_ratio``)
mask drawn once per shard (seeded), D clamped to ±``norm_constraint`` after each step; stop
after ``n_iter`` steps or when the loss is ≤ 0.02 and changes by ≤ 1e-4. The shard's threshold
is ``act_ratio`` × the smallest in-distance at the final step.

Routing (:class:`SideMemory`): **per token**, a position uses the shard whose distance is the
largest among those above their own thresholds, else the main memory. WISE averages the distance
over the tokens of each forward call (and over the batch); that makes the decision depend on how
a sequence is split into calls (teacher-forced pass vs. KV-cached decoding) and on the other rows
of the batch, so e2u routes per token: the same model whatever the evaluation path.
Merging shards (TIES, ``merge_freq``) is not implemented: more edits than one shard holds make
several shards, retrieved by the router (WISE's ``retrieve`` mode).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from e2u_models.architectures import LAYERS, MLP_OUT, engine_record, out_in_weight, with_architecture
from e2u_models.editing.adapters import Adapter
from e2u_models.editing.nullspace import check_null_space_hparams, null_space_projector
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.editing.locate import FACT_TOKENS, OneLayerChoice, module_named
from e2u_models.editing.keys import module_inputs
from e2u_models.editing.requests import KeySpec, prepare_requests
from e2u_models.editing.stats import StatsSpec, statistics_for
from e2u_models.editing.verify import check_finite, target_nll, verification
from e2u_models.editing.vstar import UpperStack, edit_stack, length_buckets
from e2u_models.layers import activation_named, hidden_activation
from e2u_models.nethook import pad_id_of
from e2u_models.question_sets import QUESTION_SETS, load_questions, off_dataset
from e2u_models.shared_prefix import continue_greedily, stop_token_ids
from e2u_models.snapshot import frozen
from e2u_tasks.errors import E2UError

NAME = "wise"
EDIT_POSITIONS = ("from_key", "key")
# n_iter, save_freq and irrelevant_per_edit share one message (they were checked together).
PER_EDIT_COUNT = {"min": 1, "message": "hparams n_iter, save_freq and irrelevant_per_edit must be >= 1"}
KIND = "editing"
USES_RETAIN = False


@dataclass(frozen=True)
class HyperParams(OneLayerChoice):
    """EasyEdit's WISE names where they mean the same (``edit_lr``, ``n_iter``, ``act_margin``,
    ``act_ratio``, ``mask_ratio``, ``norm_constraint``, ``save_freq``)."""

    layer: int | None = None
    layer_fraction: float = field(default=0.85, metadata={"range": "[0, 1]"})
    # Module paths ({} / %d / N = the layer); unset = the architecture family's.
    inner_module_tmp: str | None = field(default=None, metadata=MLP_OUT)
    layer_module_tmp: str | None = field(default=None, metadata=LAYERS)
    edit_lr: float = field(default=1.0, metadata={"above": 0})
    n_iter: int = field(default=70, metadata=PER_EDIT_COUNT)
    act_margin: list[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])
    act_ratio: float = field(default=0.88, metadata={"above": 0})
    mask_ratio: float = field(default=0.2, metadata={"range": "(0, 1]"})
    norm_constraint: float = field(default=1.0, metadata={"above": 0})
    weight_decay: float = field(default=1e-5, metadata={"min": 0})
    # Edits per side-memory shard (WISE's save_freq).
    save_freq: int = field(default=500, metadata=PER_EDIT_COUNT)
    # e2u's own irrelevant questions: "generic" (600 everyday how/why questions) or "factual"
    # (300 trivia questions in the style of TOFU's, none of them TOFU's); irrelevant_file
    # (one prompt a line) replaces them.
    irrelevant_set: str = field(default="generic", metadata={
        "choices": QUESTION_SETS, "message": "hparam {name}={value!r} is not accepted; use one of {choices} "
                                             "(or irrelevant_file=<your file>)"})
    irrelevant_file: str | None = None
    # Irrelevant prompts per edit (WISE: 1).
    irrelevant_per_edit: int = field(default=1, metadata=PER_EDIT_COUNT)
    # Up to this many tokens of the unedited model's own greedy answer follow each irrelevant
    # prompt (0 = the prompt alone). WISE's irrelevant rows carry answers; without them every
    # assistant-turn token the router sees out of scope is a prompt token.
    irrelevant_answer_tokens: int = field(default=0, metadata={"min": 0})
    target_eos: bool = True
    verify_nll: float = field(default=1.0, metadata={"above": 0})
    # Weight of the CE against the margin terms. WISE trains one edit at a time, n_iter steps
    # each; trained together (n edits), ce_scale = n would push each edit as hard as alone.
    ce_scale: float = field(default=1.0, metadata={"above": 0})
    # e2u's option, off in WISE: the side memory reads only the null space of the layer's input
    # statistics (AlphaEdit's projector, D = D̃P): tokens like those of the corpus, the question
    # format included, barely move it, so the router sees what is specific to the edits.
    # None = WISE as published; a number = AlphaEdit's nullspace_threshold (with nullspace_rule).
    nullspace_threshold: float | None = None
    nullspace_rule: str = "absolute"
    stats_corpus: str = "e2u"
    mom2_n_tokens: int = field(default=100_000, metadata={"min": 1})
    # With the null space: also keep out the directions of these questions' keys at the prompt's
    # last token (where WISE's edit tokens begin), as AlphaEdit's ``preserve_questions``.
    preserve_questions: str | None = None
    preserve_weight: float = field(default=10.0, metadata={"min": 0})
    # Where an edit's in-scope tokens are (e2u's option; WISE: from the prompt's last token on).
    # ``fact_token`` picks the key token as ROME's does; ``edit_positions`` = "from_key" (WISE: the
    # side memory writes every position from the key on, the answer's included) or "key" (only the
    # key token is in scope and edited, as ROME edits the subject's last token: with
    # ``fact_token=subject_last`` the router then fires on the question's entity, where forget and
    # retain questions differ, instead of the answer's positions, where they do not).
    fact_token: str = field(default="prompt_last", metadata={"choices": FACT_TOKENS})
    edit_positions: str = field(default="from_key", metadata={"choices": EDIT_POSITIONS})
    # How the margin terms average their hinges: "violated" (EasyEdit: over the entries that
    # violate their margin) or "all" (over every entry, as the paper's equation).
    margin_mean: str = field(default="violated", metadata={"choices": ("violated", "all")})
    # The optimiser of D: "sgd" (WISE's) or "adam" (e2u's option). SGD's step on D is edit_lr times
    # the gradient, whose size grows with the squared norm of the layer's inputs and with ce_scale;
    # where that step is too large training turns chaotic (float noise changes the outcome) and
    # where it is small enough the targets barely move. Adam steps each entry by about edit_lr
    # whatever the gradient's scale.
    optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "adam")})

    def validate(self) -> None:
        # Choices and ranges of single fields are declared on the fields; here: list shapes, rules
        # across fields, and look-ups of corpora and files.
        if len(self.act_margin) != 3 or min(self.act_margin) < 0:
            raise E2UError(f"hparam act_margin={self.act_margin} must be three numbers >= 0 [alpha, beta, gamma]")
        if self.nullspace_threshold is not None:
            check_null_space_hparams(self.nullspace_threshold, self.nullspace_rule)
        if self.preserve_questions is not None:
            if self.nullspace_threshold is None:
                raise E2UError("hparam preserve_questions shapes WISE's null space; set nullspace_threshold too")
            from e2u_models.question_sets import check_question_source

            check_question_source(self.preserve_questions, "preserve_questions")
        from e2u_models.editing.stats import corpus_kind

        corpus_kind(self.stats_corpus)
        if self.irrelevant_file is not None and not Path(self.irrelevant_file).expanduser().is_file():
            raise E2UError(f"hparam irrelevant_file={self.irrelevant_file!r} does not exist; give a "
                           "text file with one prompt a line")


def key_spec(hparams: HyperParams) -> KeySpec:
    """WISE's edit rows: the key at ``fact_token``, the bare prompt only."""
    return KeySpec(fact_token=hparams.fact_token, target_eos=hparams.target_eos)


def stats_spec(hparams: HyperParams) -> StatsSpec:
    """The statistics whose null space the side memory reads (``nullspace_threshold``)."""
    return StatsSpec(module_tmp=hparams.inner_module_tmp, stats_corpus=hparams.stats_corpus,
                     mom2_n_tokens=hparams.mom2_n_tokens, preserve_questions=hparams.preserve_questions,
                     preserve_weight=hparams.preserve_weight, fact_token=hparams.fact_token)


def activation_of(model):
    name = hidden_activation(model)
    return name, activation_named(name)


class SideMemory(Adapter):
    """WISE's side memories on one linear module: shard k holds D_k (W'_k = W + D_k) and its
    routing threshold; each token uses the shard with the largest distance above its threshold."""

    kind = "wise"

    def __init__(self, module_name: str, deltas: list[torch.Tensor], thresholds: list[float],
                 activation: str) -> None:
        super().__init__(module_name)
        self.deltas, self.thresholds, self.activation = deltas, thresholds, activation
        self.act = activation_named(activation)

    def distances(self, x: torch.Tensor, main: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = main + x @ delta.T
        return (self.act(side) - self.act(main)).norm(dim=-1), side

    def route(self, x: torch.Tensor, main: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens' inputs ``x`` (tokens, d_in) and original outputs ``main``: the shard each
        token uses (-1: the original weights) and the outputs with the side memories applied."""
        result, best = main, torch.full(main.shape[:1], -1.0, device=main.device)
        chosen = torch.full(main.shape[:1], -1, dtype=torch.long, device=main.device)
        for number, (delta, threshold) in enumerate(zip(self.deltas, self.thresholds)):
            dist, side = self.distances(x, main, delta.to(x.device))
            use = (dist > threshold) & (dist > best)
            if bool(use.any()):
                result = torch.where(use[:, None], side, result)
                best = torch.where(use, dist, best)
                chosen = torch.where(use, number, chosen)
        return chosen, result

    def rewrite(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self.deltas:
            return output
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        main = output.reshape(-1, output.shape[-1]).float()
        _, result = self.route(x, main)
        if result is main:
            return output
        return result.to(output.dtype).reshape(output.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{k}": d for k, d in enumerate(self.deltas)}

    def describe(self) -> dict[str, Any]:
        return {"shards": len(self.deltas), "thresholds": self.thresholds, "activation": self.activation}

    @classmethod
    def restore(cls, model, description: dict, tensors: dict[str, torch.Tensor]) -> "SideMemory":
        module = module_named(model, description["module"], 0, "inner_module_tmp")
        deltas = [tensors[f"delta.{k}"].to(module.weight.device, torch.float32)
                  for k in range(int(description["shards"]))]
        return cls(description["module"], deltas, [float(t) for t in description["thresholds"]],
                   description["activation"])


def routed_tokens(model, memory: SideMemory, input_ids: torch.Tensor) -> torch.Tensor:
    """The shard each token of one prompt (``input_ids`` of shape (1, T)) uses, -1 for the
    original weights: what the router decides, read without changing the model's output."""
    module = dict(model.named_modules())[memory.module_name]
    captured = {}
    handle = module.register_forward_pre_hook(lambda m, i: captured.__setitem__("x", i[0][0].float()))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        handle.remove()
    chosen, _ = memory.route(captured["x"], F.linear(captured["x"], module.weight.float()))
    return chosen


def irrelevant_prompts(hparams: HyperParams, count: int, seed: int, render,
                       dataset_rows: Sequence[tuple[str, str]] = ()) -> list[str]:
    """``count`` irrelevant questions (seeded draw, recycled when too few), rendered like the
    evaluation renders questions; those about the evaluated dataset's entities are left out."""
    source = hparams.irrelevant_file or hparams.irrelevant_set
    lines = off_dataset(load_questions(source), dataset_rows)
    if not lines:
        raise E2UError(f"WISE's irrelevant questions ({source}) are all about entities of the "
                       "evaluated dataset; give irrelevant_file=<other questions>")
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    return [render(lines[order[i % len(order)]]) for i in range(count)]


def with_own_answers(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt followed by the model's greedy answer (up to ``max_new_tokens``, its end-of-turn
    token included): irrelevant rows as the model itself would continue them."""
    if max_new_tokens == 0:
        return prompts_ids
    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        answers = continue_greedily(model, prompts_ids, pad_id_of(tokenizer), max_new_tokens,
                                    lambda _row, tokens: tokens[-1] in stops)
    finally:
        model.train(was_training)
    return [list(p) + a for p, a in zip(prompts_ids, answers)]


def hinge_mean(values: torch.Tensor, over: str = "violated") -> torch.Tensor:
    """The margin terms' average of max(0, values): over the positive (violated) entries only,
    0 when none is (``violated``, EasyEdit's), or over all entries (``all``, the paper's)."""
    if over == "all":
        return torch.relu(values).mean()
    positive = values > 0
    return values[positive].mean() if bool(positive.any()) else values.new_zeros(())


@dataclass
class EditGroup:
    """Edit rows of similar length run through the network above the edit together: their stack,
    the edited module's inputs the side memory writes in the CE (the key (rows, d_in) or every
    token from the key on (rows, S, d_in)), and where their labels sit."""

    stack: UpperStack
    written_x: torch.Tensor
    label_rows: torch.Tensor
    label_cols: torch.Tensor
    labels: torch.Tensor


def edit_groups(model, tokenizer, rows, layer_module_tmp: str, layer: int, module_name: str,
                key_only: bool) -> tuple[list[EditGroup], torch.Tensor, torch.Tensor]:
    """The edit rows in groups of similar length (padding all to the longest would spend much of
    each step on padding), and the edited module's inputs (float32) in scope (tokens, d_in) and
    out of scope on the edit rows (tokens, d_in): the key (``key_only``) or every token from the
    key on is in scope, the rest of the row out of scope."""
    groups, in_parts, out_parts = [], [], []
    for members in length_buckets([len(r.ids) - r.key for r in rows]):
        chosen = [rows[j] for j in members]
        stack = edit_stack(model, tokenizer, chosen, layer_module_tmp, layer, module_name, capture_input=module_name)
        P = stack.P
        x_all = stack.captured_input.float()                       # (n, P + S, d_in)
        real = stack.layout_mask.bool()
        suffix_x, suffix_real = x_all[:, P:], real[:, P:]
        in_parts.append(suffix_x[:, 0] if key_only else suffix_x[suffix_real])
        written_x = suffix_x[:, 0] if key_only else suffix_x
        edit_out = real.clone()
        if key_only:
            edit_out[:, P] = False
        else:
            edit_out[:, P:] = False
        out_parts.append(x_all[edit_out])
        device = x_all.device
        stack.select(torch.arange(len(chosen), device=device))
        label_index = [(b, r.label_start - r.key + j) for b, r in enumerate(chosen) for j in range(len(r.labels))]
        groups.append(EditGroup(stack, written_x, torch.tensor([b for b, _ in label_index], device=device),
                                torch.tensor([j for _, j in label_index], device=device),
                                torch.tensor([t for r in chosen for t in r.labels], device=device)))
    return groups, torch.cat(in_parts), torch.cat(out_parts)


def train_shard(model, tokenizer, prepared, irrelevant_ids, hparams: HyperParams, layer: int,
                module_name: str, seed: int, desc: str,
                projector: torch.Tensor | None = None) -> tuple[torch.Tensor, float, dict]:
    """One side-memory shard for these prepared requests: (D, threshold, training record). With a
    ``projector`` P the side memory is D̃P: inputs are projected once, D̃ is trained."""
    module = module_named(model, module_name, 0, "inner_module_tmp")
    weight = out_in_weight(module)
    rows = [p.nll_rows(i)[0] for i, p in enumerate(prepared)]
    key_only = hparams.edit_positions == "key"
    groups, in_x, edit_out_x = edit_groups(model, tokenizer, rows, hparams.layer_module_tmp, layer,
                                           module_name, key_only)
    # Out of scope: the edit rows' other tokens and every token of the irrelevant rows.
    out_x = torch.cat([edit_out_x, module_inputs(model, tokenizer, irrelevant_ids, module_name)])
    with torch.no_grad():
        in_main = F.linear(in_x, weight.float())
        out_main = F.linear(out_x, weight.float())
    if projector is not None:  # the side memory reads the projected inputs from here on
        project = projector.to(weight.device, torch.float32)
        in_x, out_x = in_x @ project, out_x @ project
        for group in groups:
            group.written_x = group.written_x @ project
    _, act = activation_of(model)
    alpha, beta, gamma = hparams.act_margin
    over = hparams.margin_mean
    device = weight.device
    labels = torch.cat([group.labels for group in groups])

    generator = torch.Generator(device="cpu").manual_seed(seed)
    grad_mask = (torch.rand(weight.shape, generator=generator) < hparams.mask_ratio).to(device, torch.float32)
    delta = torch.zeros(weight.shape, device=device, dtype=torch.float32, requires_grad=True)
    optimiser_class = torch.optim.Adam if hparams.optimizer == "adam" else torch.optim.SGD
    optimiser = optimiser_class([delta], lr=hparams.edit_lr, weight_decay=hparams.weight_decay)
    record: dict = {"steps": 0}
    previous = None
    with frozen(model):
        with tqdm(total=hparams.n_iter, desc=desc, leave=False) as progress:
            for step in range(hparams.n_iter):
                d_in = (act(in_main + in_x @ delta.T) - act(in_main)).norm(dim=-1)
                d_out = (act(out_main + out_x @ delta.T) - act(out_main)).norm(dim=-1)
                picked = []
                for group in groups:
                    hidden = group.stack.run(group.written_x @ delta.T)
                    picked.append(hidden[group.label_rows, group.label_cols])
                logprobs = groups[0].stack.logprobs(torch.cat(picked))
                nll = -logprobs.gather(-1, labels[:, None]).mean()
                margin = (hinge_mean(d_out - alpha, over) + hinge_mean(beta - d_in, over)
                          + hinge_mean(d_out[:, None] - d_in[None, :] + gamma, over))
                loss = hparams.ce_scale * nll + margin
                if not torch.isfinite(loss):
                    raise E2UError(f"WISE loss is not finite (NaN/inf) at step {step}; the model was left unedited")
                value, nll_value = float(loss.detach()), float(nll.detach())
                record.update(steps=step + 1, loss=round(value, 4), nll=round(nll_value, 4),
                              in_min=round(float(d_in.detach().min()), 3),
                              out_max=round(float(d_out.detach().max()), 3))
                progress.set_postfix(loss=f"{value:.3f}", nll=f"{nll_value:.3f}")
                progress.update(1)
                if (previous is not None and abs(previous - value) <= 1e-4 and value <= 0.02) \
                        or step == hparams.n_iter - 1:
                    break
                previous = value
                optimiser.zero_grad()
                loss.backward()
                delta.grad.mul_(grad_mask)
                optimiser.step()
                with torch.no_grad():
                    delta.clamp_(-hparams.norm_constraint, hparams.norm_constraint)
    threshold = hparams.act_ratio * record["in_min"]
    side = delta.detach() if projector is None else delta.detach() @ project
    return side, threshold, record


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    hparams = with_architecture(hparams, model)
    layer, module_name, module = hparams.edit_site(model)
    architecture = engine_record(model, module_name, module_name, hparams.layer_module_tmp.format(layer),
                                 True, env.log)
    prepared = prepare_requests(model, tokenizer, forget, key_spec(hparams), env, seed)
    before = target_nll(model, tokenizer, prepared)
    activation, _ = activation_of(model)
    memory = SideMemory(module_name, [], [], activation)
    shards = []
    started = time.perf_counter()
    projector, null_space = None, None
    if hparams.nullspace_threshold is not None:
        moments, statistics = statistics_for(model, tokenizer, stats_spec(hparams), [layer], env)
        projector, kept = null_space_projector(moments[layer].to(module.weight.device),
                                               hparams.nullspace_threshold, hparams.nullspace_rule)
        if kept == 0:
            raise E2UError(f"WISE's null space at layer {layer} is empty at nullspace_threshold="
                           f"{hparams.nullspace_threshold} ({hparams.nullspace_rule}); raise it")
        null_space = {"dimensions": kept, "of": int(moments[layer].shape[0]), "statistics": statistics}
        env.log(f"e2u: WISE side memory reads the null space: {kept}/{moments[layer].shape[0]} dimensions")
    for number, start in enumerate(range(0, len(prepared), hparams.save_freq)):
        chunk = prepared[start: start + hparams.save_freq]
        prompts = irrelevant_prompts(hparams, len(chunk) * hparams.irrelevant_per_edit, seed + number,
                                     env.render, env.dataset_rows)
        answering = time.perf_counter()
        irrelevant_ids = with_own_answers(model, tokenizer, [env.encode(p) for p in prompts],
                                          hparams.irrelevant_answer_tokens)
        if hparams.irrelevant_answer_tokens:
            env.log(f"e2u: WISE: the model answered {len(prompts)} irrelevant prompts (up to "
                    f"{hparams.irrelevant_answer_tokens} tokens) in {time.perf_counter() - answering:.1f} s")
        delta, threshold, record = train_shard(
            model, tokenizer, chunk, irrelevant_ids, hparams, layer, module_name,
            seed + number, desc=f"WISE shard {number + 1} ({len(chunk)} edits)", projector=projector)
        check_finite(delta, f"WISE side memory shard {number}")
        memory.deltas.append(delta)
        memory.thresholds.append(threshold)
        shards.append({**record, "edits": len(chunk), "threshold": round(threshold, 4),
                       "delta_norm": round(float(delta.norm()), 4)})
        env.log(f"e2u: WISE shard {number + 1}: {len(chunk)} edits, {record['steps']} steps, loss "
                f"{record['loss']}, threshold {threshold:.3f}")
    memory.attach(model)
    after = target_nll(model, tokenizer, prepared)
    details: dict[str, Any] = {
        "layer": layer, "module": module_name, "requests": len(prepared),
        "protocol": f"shards of up to {hparams.save_freq} edits trained together",
        "routing": "per token",
        "irrelevant_source": hparams.irrelevant_file or f"e2u {hparams.irrelevant_set} questions",
        "shards": shards, "training_seconds": round(time.perf_counter() - started, 2),
        "null_space": null_space,
        "adapters": [{"kind": memory.kind, "module": module_name}],
        "architecture": architecture,
    }
    details["verification"] = verification(before, after, prepared, hparams.verify_nll, {}, env.log)
    return MethodReport(method=NAME, details=details)
