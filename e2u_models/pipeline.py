"""What ``--model e2u`` does to the loaded model before evaluating it, as named steps:

finetune (``finetune=``) -> hash the model -> known rows (``known_only=true``) -> refusal targets
-> the method -> attack (``attack=``) -> save (``save_edited``).

Each step reads the checked :class:`~e2u_models.args.E2UArgs` and records its result in
:class:`Prepared`; the fine-tuning, self-written targets, the edit and relearning are cached, so
a rerun (or another rank under ``accelerate launch``) loads them instead of recomputing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from e2u_models.args import E2UArgs
from e2u_models.edit_cache import EditCache, edit_key
from e2u_models.edit_cache import model_sha256 as edit_model_sha256
from e2u_models.editing.adapters import adapters_of
from e2u_models.prompts import PromptFormat
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport, uses_retain
from e2u_models.provenance import e2u_info, environment_fingerprint, resource_usage
from e2u_models.question_sets import load_questions, off_dataset
from e2u_models.saving import save_edited_model
from e2u_models.targets import RefusalTargets
from e2u_models.training.finetune import finetune as finetune_model

log = logging.getLogger(__name__)


def log_line(message: str) -> None:
    log.warning(message)


@dataclass(frozen=True)
class Runtime:
    """What the steps need from the lm-eval model besides its weights and tokenizer."""

    prompt_format: PromptFormat
    encode: Callable[[str], list[int]]
    # Greedy answers to bare questions, decoded as the e2u tasks decode (the ROUGE check).
    answer_fn: Callable[[Sequence[EditRequest]], list[str]]
    model_source: dict[str, Any]
    device: Any = None
    # ``accelerate launch``: rank 0 runs the cached steps first, the other ranks then load them.
    main_process_first: Callable[[], Any] = contextlib.nullcontext


@dataclass
class Prepared:
    """The steps' results, in the order they are produced."""

    targets: RefusalTargets  # with the per-row targets once written or read
    finetune_report: dict | None = None
    model_sha256: str | None = None  # content hash of the model the method starts from
    target_report: dict[str, Any] = field(default_factory=dict)
    method_report: MethodReport | None = None
    edit_usage: dict[str, Any] = field(default_factory=dict)  # run card of the steps above
    edited_at: float = 0.0
    # the args the steps ran with: the given ones, with the split of the known rows once chosen
    args: E2UArgs | None = None
    known_report: dict[str, Any] | None = None  # known_only=true: rule, cache key and hit
    attack_report: dict[str, Any] | None = None  # attack=: its settings, what it did, cache

    def has_targets(self) -> bool:
        """False only for ``target=self`` with ``method=none`` (nothing to write targets for)."""
        return not self.targets.per_question or self.targets.per_row is not None


def prepare(model, tokenizer, args: E2UArgs, runtime: Runtime) -> Prepared:
    """Run the steps on ``model`` in place; what they did, for the run card."""
    state = Prepared(targets=args.targets, args=args)
    started = time.perf_counter()
    with runtime.main_process_first():
        for step in (finetune, hash_model, select_known, resolve_targets, apply_method, attack):
            step(model, tokenizer, state.args, runtime, state)
    state.edit_usage = resource_usage(started, runtime.device)
    state.edited_at = time.perf_counter()
    save(model, tokenizer, state.args, runtime, state)
    return state


# --------------------------------------------------------------------------- the steps


def finetune(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """``finetune=<dataset>``: teach the model every row of the dataset first."""
    if args.finetune is None:
        return
    requests = [EditRequest(index=i, question=row["question"], answer=row["answer"],
                            prompt=runtime.prompt_format.render(tokenizer, row["question"]))
                for i, row in enumerate(args.finetune_rows)]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    state.finetune_report = finetune_model(
        model, tokenizer, requests, args.finetune_hparams.values, dataset=args.finetune,
        seed=args.seed, env=method_env(tokenizer, args, runtime), answer_fn=runtime.answer_fn,
        cache_dir=args.cache_dir, use_cache=args.use_cache,
        computed_on=environment_fingerprint(runtime.device, model.dtype))
    model.eval()


def hash_model(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """The content hash before the method: the caches of targets and edits are keyed by it."""
    state.model_sha256 = edit_model_sha256(model)


def select_known(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """``known_only=true``: the unedited model answers every row; forget and retain are chosen
    among the rows it answers correctly, and the tasks of this process evaluate those."""
    spec = args.splits.spec
    if not spec.known_only:
        return
    from e2u_models.known_rows import known_rows
    from e2u_models.model import task_generation_kwargs
    from e2u_tasks.splits import register_known

    was_training = model.training
    model.eval()
    try:
        # too few known rows for the asked split: one error line, before anything is cached
        splits, state.known_report = known_rows(
            args.splits.rows, runtime.answer_fn, model_sha256=state.model_sha256,
            prompt=runtime.prompt_format.describe(), generation=task_generation_kwargs(),
            cache_dir=args.cache_dir, use_cache=args.use_cache, log=log_line,
            check=lambda known: spec.load(known=known))
    finally:
        model.train(was_training)
    register_known(splits)
    state.args = dataclasses.replace(args, splits=splits)


def resolve_targets(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """Per-question targets: read from ``targets_file`` or written by the unedited model
    (``target=self``); then ``export_targets`` writes what the method will use."""
    rows = {i: args.splits.rows[i]["question"] for i in args.splits.forget}
    records = None
    if state.targets.mode == "file":
        state.targets = state.targets.bind_file(rows)
    elif state.targets.mode == "self" and (args.method.NAME != "none" or args.export_targets):
        from e2u_models.self_targets import write_self_targets

        written, provenance = write_self_targets(
            model, tokenizer, runtime.prompt_format,
            [{"index": i, "question": q, "answer": args.splits.rows[i]["answer"]} for i, q in rows.items()],
            args.seed, model_sha256=state.model_sha256, cache_dir=args.cache_dir,
            use_cache=args.use_cache, log=log_line)
        state.targets = state.targets.with_rows({t.index: t.target for t in written})
        records = [dataclasses.asdict(t) for t in written]
        state.target_report = {**provenance, "fallbacks": [t.index for t in written if t.source == "fallback"]}
    if args.export_targets and (state.targets.mode != "self" or records is not None):
        from e2u_models.self_targets import export_targets

        records = records or [{"index": i, "question": q, "answer": args.splits.rows[i]["answer"],
                               "target": state.targets.for_row(i, args.seed),
                               "source": state.targets.mode} for i, q in rows.items()]
        export_targets(args.export_targets, records)
        state.target_report["exported_to"] = args.export_targets


def apply_method(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """The method on the forget split (and the retain split if it uses one); an edit found in the
    edit cache is loaded instead of recomputed."""
    name = args.method.NAME
    forget = edit_requests(tokenizer, args, runtime, state, args.splits.forget, with_targets=True)
    retain = edit_requests(tokenizer, args, runtime, state, args.splits.retain) \
        if uses_retain(args.method, args.hparams.values) else None
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    env = method_env(tokenizer, args, runtime)
    cache, key, inputs = None, None, None
    if name != "none" and args.use_cache:
        cache = EditCache(args.cache_dir, log=log_line)
        inputs = edit_inputs(model, args, runtime, state, forget, retain)
        key = edit_key(inputs)
        cached = cache.load(key, model)
        if cached is not None:
            report = MethodReport(**{k: v for k, v in cached.items() if k not in ("seconds", "computed_on")})
            report.details = {**report.details, "edit_cache": {"hit": True, "key": key,
                              "seconds_when_computed": cached.get("seconds"),
                              "computed_on": cached.get("computed_on")}}
            report.seconds = round(time.perf_counter() - started, 3)
            log.warning("e2u: %s edit loaded from the edit cache in %.1f s", name, report.seconds)
            model.eval()
            state.method_report = report
            return
    if name != "none":
        log.warning("e2u: applying %s to %d forget requests", name, len(forget))
    loaded = len(adapters_of(model))  # adapters that came with the loaded model
    report = args.method.apply(model, tokenizer, forget, retain, args.hparams.values, seed=args.seed, env=env)
    report.seconds = round(time.perf_counter() - started, 3)
    if name != "none":
        log.warning("e2u: %s done in %.1f s", name, report.seconds)
    if cache is not None and (report.changed_parameters or len(adapters_of(model)) > loaded):
        # The machine that computed the edit travels with it, so a run that loads it elsewhere
        # can tell: the key leaves the machine out, and a GPU's edit is not a CPU's.
        computed_on = environment_fingerprint(runtime.device, model.dtype)
        cache.save(key, model, report.changed_parameters, {**report.as_dict(), "computed_on": computed_on},
                   inputs, first_adapter=loaded)
        report.details = {**report.details, "edit_cache": {"hit": False, "key": key}}
    model.eval()
    state.method_report = report


def attack(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """``attack=``: a recovery attack on the model the method left (quantisation, relearning),
    before the evaluation; the edit itself came from the edit cache (with or without an attack)."""
    if args.attack is None:
        return
    from e2u_models.attacks.run import run_attack

    spec = args.attack
    rows = None
    if spec.name == "relearn":
        rows = args.splits.relearn if spec.data == "forget_half" else args.splits.retain
    requests = edit_requests(tokenizer, args, runtime, state, rows) if rows is not None else None
    state.attack_report = run_attack(model, tokenizer, spec, requests, seed=args.seed,
                                     env=method_env(tokenizer, args, runtime),
                                     cache_dir=args.cache_dir, use_cache=args.use_cache)


def save(model, tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared) -> None:
    """``save_edited``: the edited model and its run card, loadable as ``pretrained=``."""
    if args.save_edited is None:
        return
    run_card = {"edit": state.edit_usage, "evaluation": resource_usage(state.edited_at, runtime.device)}
    info = e2u_info(args, state, runtime.prompt_format, runtime.model_source, run_card,
                    environment_fingerprint(runtime.device, model.dtype))
    save_edited_model(model, tokenizer, args.save_edited,
                      {"method_report": state.method_report.as_dict(), **info}, log=log_line)


# --------------------------------------------------------------------------- shared by the steps


def edit_requests(tokenizer, args: E2UArgs, runtime: Runtime, state: Prepared, indices,
                  with_targets: bool = False) -> list[EditRequest]:
    """Edit requests of dataset rows, prompts rendered exactly as the evaluation renders them;
    forget requests carry their refusal target."""
    rows, requests = args.splits.rows, []
    for i in indices:
        question = rows[i]["question"]
        requests.append(EditRequest(
            index=i, question=question, answer=rows[i]["answer"],
            prompt=runtime.prompt_format.render(tokenizer, question),
            target=state.targets.for_row(i, args.seed) if with_targets and state.has_targets() else None,
            subject=rows[i].get("subject")))
    return requests


def dataset_rows(args: E2UArgs) -> tuple[tuple[str, str], ...]:
    """(question, answer) of every row of the evaluated dataset."""
    return tuple((row["question"], row["answer"]) for row in args.splits.rows)


def method_env(tokenizer, args: E2UArgs, runtime: Runtime) -> MethodEnv:
    prompt_format = runtime.prompt_format
    return MethodEnv(encode=runtime.encode,
                     render=lambda question: prompt_format.render(tokenizer, question),
                     answer_delimiter=prompt_format.answer_delimiter,
                     cache_dir=args.cache_dir, log=log_line, dataset_rows=dataset_rows(args))


def edit_inputs(model, args: E2UArgs, runtime: Runtime, state: Prepared, forget: list[EditRequest],
                retain: list[EditRequest] | None) -> dict:
    """Everything an edit depends on besides the code (hashed into the edit cache key)."""
    hparams = args.hparams.values
    inputs = {"model_sha256": state.model_sha256, "method": args.method.NAME,
              "hparams": dataclasses.asdict(hparams), "seed": args.seed,
              "forget": [dataclasses.asdict(r) for r in forget],
              "retain": [dataclasses.asdict(r) for r in retain] if retain else None,
              "prompt": runtime.prompt_format.describe(), "dtype": str(model.dtype),
              "adapters": runtime.model_source.get("adapters")}
    preserve = getattr(hparams, "preserve_questions", None)
    if preserve is not None:  # the questions themselves, not their file name
        inputs["preserved_questions"] = off_dataset(load_questions(preserve), dataset_rows(args))
    return inputs
