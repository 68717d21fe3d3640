"""Finetune-then-unlearn: teach the model a dataset before a method makes it forget part of it.

PISTOL's knowledge is synthetic, so an un-tuned model knows none of it and there is nothing to
unlearn. ``finetune=<dataset>`` (``pistol``, ``tofu_factual`` or any dataset the loaders know)
fine-tunes the model on *all* its QA pairs (prompts rendered as the evaluation renders them, loss
on the answer tokens + EOS) with the shared training loop (:mod:`e2u_models.training.loop`), until
the greedy ROUGE-1 recall on the dataset, computed by the evaluation's own decoding and metric,
reaches ``target_rouge`` or ``epochs`` (the maximum) have run. Each epoch scores a seeded subset of
``check_rows`` rows (cheap); once the subset reaches the target the whole dataset is scored, and
only that decides. The result is cached (changed weights as safetensors, written atomically and
verified by sha256 on load) keyed by the base model's hash, the data and prompt hash, the recipe,
the seed and the training code, so every method on the same dataset starts from the same model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from e2u_models.cache import json_sha256
from e2u_models.edit_cache import EditCache, code_sha256, model_sha256
from e2u_models.protocol import EditRequest, MethodEnv
from e2u_models.training.hparams import TrainHParams
from e2u_models.training.loop import TrainSetup, train
from e2u_models.training.batching import examples_of
from e2u_models.training.losses import nll
from e2u_tasks.errors import E2UError
from e2u_tasks.metrics import rouge1_recall, rouge1_scorer

HPARAMS_NAME = "finetune"  # hparams/finetune.yaml and presets in hparams/finetune/
FORMAT_VERSION = 1
CHECK_MESSAGE = "finetune_check_rows must be >= 0 and finetune_check_from_epoch >= 1"


@dataclass(frozen=True)
class FinetuneHParams(TrainHParams):
    """The fine-tuning recipe (``finetune_<name>=`` in ``--model_args`` overrides one)."""

    lr: float = 1e-4
    epochs: int = 20
    train_batch_size: int = 16
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    target_rouge: float = field(default=0.95, metadata={
        "range": "(0, 1]", "message": "finetune_target_rouge={value} must be in (0, 1]"})
    # Rows scored after each epoch (a seeded subset, 0 = all); the final check scores all rows.
    check_rows: int = field(default=100, metadata={"min": 0, "message": CHECK_MESSAGE})
    check_from_epoch: int = field(default=1, metadata={"min": 1, "message": CHECK_MESSAGE})


AnswerFn = Callable[[Sequence[EditRequest]], list[str]]


def mean_rouge(requests: Sequence[EditRequest], answer_fn: AnswerFn, scorer) -> float:
    """Mean greedy ROUGE-1 recall of the gold answers, as the evaluation computes it."""
    generations = answer_fn(requests)
    return sum(rouge1_recall(r.answer, g, scorer) for r, g in zip(requests, generations)) / len(requests)


def finetune(model, tokenizer, requests: Sequence[EditRequest], hparams: FinetuneHParams, *,
             dataset: str, seed: int, env: MethodEnv, answer_fn: AnswerFn,
             cache_dir: str | None = None, use_cache: bool = True, computed_on: dict | None = None) -> dict:
    """Fine-tune ``model`` in place on every request (or load the cached result); the report.

    ``computed_on`` (the environment fingerprint) is stored with a fine-tune it computes: hundreds
    of steps at a high learning rate let the machine's rounding decide which model comes out, so
    a run that loads the cached model can tell where it was made."""
    import torch

    if not requests:
        raise E2UError(f"finetune={dataset}: the dataset has no rows")
    started = time.perf_counter()
    recipe = dataclasses.asdict(hparams)
    inputs = {"model_sha256": model_sha256(model), "dataset": dataset,
              "data_sha256": json_sha256([[r.question, r.prompt, r.answer] for r in requests]),
              "recipe": recipe, "seed": seed, "code": code_sha256(__name__), "dtype": str(model.dtype),
              "format": FORMAT_VERSION}
    key = json_sha256(inputs)
    summary = {"dataset": dataset, "rows": len(requests), "recipe": recipe,
               "recipe_sha256": json_sha256(recipe), "data_sha256": inputs["data_sha256"],
               "base_model_sha256": inputs["model_sha256"], "seed": seed, "cache_key": key}
    cache = EditCache(cache_dir, log=env.log, folder="finetuned") if use_cache else None
    if cache is not None:
        cached = cache.load(key, model)
        if cached is not None:
            seconds = time.perf_counter() - started
            env.log(f"e2u: finetune={dataset} loaded from the cache in {seconds:.1f} s "
                    f"(ROUGE-1 {cached.get('rouge1_all')}, {cached.get('epochs_run')} epochs)")
            model.eval()
            return {**cached, "cache_hit": True, "seconds": round(seconds, 2)}

    scorer = rouge1_scorer()
    generator = torch.Generator().manual_seed(seed)
    subset = requests
    if hparams.check_rows and hparams.check_rows < len(requests):
        picks = torch.randperm(len(requests), generator=generator)[: hparams.check_rows].tolist()
        subset = [requests[i] for i in sorted(picks)]
    history: list[dict] = []
    state = {"all": None}

    def on_epoch_end(epoch: int) -> bool:
        state["all"] = None
        if epoch < hparams.check_from_epoch:
            return False
        checked = time.perf_counter()
        score = mean_rouge(subset, answer_fn, scorer)
        entry = {"epoch": epoch, "rouge1_subset": round(score, 4), "subset_rows": len(subset)}
        if score >= hparams.target_rouge:
            state["all"] = mean_rouge(requests, answer_fn, scorer) if subset is not requests else score
            entry["rouge1_all"] = round(state["all"], 4)
        entry["check_seconds"] = round(time.perf_counter() - checked, 1)
        history.append(entry)
        env.log(f"e2u: finetune={dataset} epoch {epoch}: ROUGE-1 {entry}")
        return state["all"] is not None and state["all"] >= hparams.target_rouge

    setup = TrainSetup(name=f"finetune={dataset}", forget=examples_of(tokenizer, env, requests, hparams),
                       loss=lambda network, step, reference: (nll(network, step.forget), {}),
                       on_epoch_end=on_epoch_end)
    run = train(model, tokenizer, setup, hparams, seed=seed, log=env.log)
    model.eval()
    final = state["all"] if state["all"] is not None else mean_rouge(requests, answer_fn, scorer)
    reached = final >= hparams.target_rouge
    seconds = time.perf_counter() - started
    changed = run.pop("changed_parameters")
    report = {**summary, "epochs_run": run["epochs_run"], "rouge1_all": round(final, 4),
              "target_rouge": hparams.target_rouge, "target_reached": reached,
              "rouge_history": history, "train": run, "seconds_when_computed": round(seconds, 2),
              "computed_on": computed_on}
    if not reached:
        env.log(f"e2u: finetune={dataset} stopped at the maximum of {hparams.epochs} epochs with "
                f"ROUGE-1 {final:.3f} < target {hparams.target_rouge} (recorded in the results)")
    env.log(f"e2u: finetune={dataset} done in {seconds:.1f} s: {run['epochs_run']} epochs, "
            f"ROUGE-1 on all {len(requests)} rows {final:.3f}")
    if cache is not None and changed:
        cache.save(key, model, changed, report, inputs)
    return {**report, "cache_hit": False, "seconds": round(seconds, 2)}
