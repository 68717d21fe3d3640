"""The ``e2u`` lm-eval model: an ``HFLM`` that applies an unlearning method before evaluating.

Like lm-eval's ``steered`` model it changes the network once at construction and then evaluates
like ``hf``, so the edited model also runs any other lm-eval task in the same command. On top of
``hf`` it serves the ``e2u_answer`` request type (greedy answer plus per-token log-probabilities
and ranks of the gold answer) that the e2u tasks need, and renders bare questions with :class:`~e2u_models.prompts.PromptFormat` so the
evaluation prompt is exactly the prompt a method edited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import inspect
import json
import logging
import os
import random
import sys
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from e2u_models.editing.adapters import adapters_of, has_saved_adapters, load_adapters
from e2u_models.autoload import CLI_NAMES
from e2u_models.cache import cache_root, json_sha256
from e2u_models.training.finetune import HPARAMS_NAME as FINETUNE_HPARAMS
from e2u_models.training.finetune import FinetuneHParams
from e2u_models.training.finetune import finetune as finetune_model
from e2u_models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_embedded
from e2u_models.methods import get_method
from e2u_models.edit_cache import EditCache, edit_key
from e2u_models.edit_cache import model_sha256 as edit_model_sha256
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.hparams import has_presets, hparams_file, load_hparams, resolve_hparams_path
from e2u_models.question_sets import load_questions, off_dataset
from e2u_models.prompts import PromptFormat, parse_chat_template
from e2u_models.saving import check_save_target, save_edited_model
from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length
from e2u_models.targets import RefusalTargets
from e2u_tasks.data import BENCHMARKS, load_benchmark, load_user_dataset
from e2u_tasks.errors import E2UError
from e2u_tasks.metrics import DEFAULT_TOP_M
from e2u_tasks.splits import SPEC_KEYS, SplitSpec, parse_int

log = logging.getLogger(__name__)

# Keyword arguments HFLM forwards to ``from_pretrained`` that users legitimately pass.
FROM_PRETRAINED_ARGS = frozenset({
    "attn_implementation", "low_cpu_mem_usage", "device_map", "quantization_config",
    "load_in_8bit", "load_in_4bit", "token", "torch_dtype", "use_safetensors",
})
HFLM_ARGS = frozenset(name for name, p in inspect.signature(HFLM.__init__).parameters.items()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self")
# Batch size when neither --batch_size nor model_args batch_size is given (generation dominates
# the run time and batches well).
DEFAULT_BATCH_SIZE = 64
E2U_ARGS = ("pretrained", "method", "hparams", "seed", "cache_dir", "cache", "chat_template",
            "system_prompt", "top_m", "target", "refusal_file", "targets_file", "export_targets",
            "finetune", "finetune_hparams", "finetune_<recipe key>", "save_edited", *SPEC_KEYS)
FINETUNE_PREFIX = "finetune_"


def _check_local_model(pretrained: str) -> None:
    """A ``pretrained`` that names a local path must be a model folder (hub ids pass through)."""
    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise E2UError(
            f"pretrained={pretrained!r} is not a model folder (no config.json there); give a hub "
            f"id, a saved model folder or {', '.join(EMBEDDED_MODELS)}"
        )


def _load_config(pretrained: str, kwargs: dict):
    """The model's config alone (cheap), so hparams can be checked against it before loading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(pretrained, revision=kwargs.get("revision") or "main",
                                          trust_remote_code=bool(kwargs.get("trust_remote_code")))
    except Exception:  # noqa: BLE001 - HFLM gives the real error when it loads the model
        return None


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise E2UError(f"{name}={value!r} is not accepted; use true or false")


def _check_export_path(path: str | None) -> str | None:
    """``export_targets`` must be writable; checked before any model work."""
    if path in (None, ""):
        return None
    target = Path(path).expanduser()
    if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise E2UError(f"export_targets={path!r} is not a writable file path (its folder must "
                       "exist); give e.g. export_targets=targets.jsonl")
    return str(target)


def _is_greedy(gen_kwargs: dict) -> bool:
    return not gen_kwargs.get("do_sample") and not float(gen_kwargs.get("temperature") or 0.0)


def _cli_default_batch_size() -> bool:
    """True when lm-eval's CLI passed its default batch size 1 (no ``--batch_size`` flag)."""
    program = sys.argv[0].replace("\\", "/") if sys.argv else ""
    as_module = program.endswith(("lm_eval/__main__.py", "e2u_models/cli.py"))  # python -m ...
    if os.path.basename(program) not in CLI_NAMES and not as_module:
        return False
    return not any(arg == "--batch_size" or arg.startswith("--batch_size=") for arg in sys.argv[1:])


@lru_cache(maxsize=1)
def task_generation_kwargs() -> dict:
    """The e2u tasks' greedy generation settings (``until``, ``max_gen_toks``), read from their
    shared config so checks outside lm-eval (the fine-tuning ROUGE check) decode the same way."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    from importlib import resources

    text = resources.files("task_configs").joinpath("_e2u_base.yaml").read_text(encoding="utf-8")
    config = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader
    kwargs = config["generation_kwargs"]
    return {"until": list(kwargs["until"]), "max_gen_toks": int(kwargs["max_gen_toks"])}


def _log_line(message: str) -> None:
    log.warning(message)


def resource_usage(started: float, device: Any = None) -> dict[str, Any]:
    """Run-card cost figures of a phase: wall seconds since ``started`` and peak memory so far.

    ``peak_rss_bytes`` is the process's peak resident memory up to now (Unix ``getrusage``; absent
    elsewhere); on CUDA, ``cuda_peak_bytes`` is the phase's peak allocation (the counter is reset,
    so the next phase starts from zero).
    """
    usage: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 3)}
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        usage["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    except ImportError:  # Windows
        pass
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        usage["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    return usage


def _package_versions() -> dict[str, str]:
    versions = {}
    for dist in ("e2u", "lm_eval", "torch", "transformers", "datasets", "rouge_score"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


@register_model("e2u")
class E2ULM(HFLM):
    """``--model e2u --model_args pretrained=...,method=...,<split args>,<hparam overrides>``."""

    def __init__(self, pretrained: Any = DEFAULT_MODEL, method: str | None = "none",
                 hparams: str | None = None, seed: Any = 0, cache_dir: str | None = None,
                 chat_template: Any = "auto", system_prompt: str | None = None,
                 top_m: Any = DEFAULT_TOP_M, target: str | None = None,
                 refusal_file: str | None = None, targets_file: str | None = None,
                 export_targets: str | None = None, cache: Any = True, finetune: str | None = None,
                 finetune_hparams: str | None = None, save_edited: str | None = None,
                 **kwargs: Any) -> None:
        # Everything that can be wrong in the arguments is checked before any model is loaded.
        method_name = "none" if method in (None, "", "None") else str(method).strip().lower()
        self.method = get_method(method_name)
        spec_args = {key: kwargs.pop(key) for key in SPEC_KEYS if key in kwargs}
        hparam_names = {f.name for f in dataclasses.fields(self.method.HyperParams)}
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in hparam_names}
        recipe_names = {f.name for f in dataclasses.fields(FinetuneHParams)}
        recipe_overrides = {key[len(FINETUNE_PREFIX):]: kwargs.pop(key) for key in list(kwargs)
                            if key.startswith(FINETUNE_PREFIX) and key[len(FINETUNE_PREFIX):] in recipe_names}
        unknown = sorted(k for k in kwargs if k not in HFLM_ARGS and k not in FROM_PRETRAINED_ARGS)
        if unknown:
            raise E2UError(
                f"unknown model arg(s) {', '.join(unknown)} for --model e2u; accepted: "
                f"{', '.join(E2U_ARGS)}, the hparams of method={method_name} "
                f"({', '.join(sorted(hparam_names)) or 'none'}) and the hf model args"
            )
        # Types, names and ranges checked now; the model-specific preset is chosen from the config.
        self.hparams_source = resolve_hparams_path(method_name, hparams)
        self.hparams = load_hparams(self.method.HyperParams, method_name, self.hparams_source, overrides)
        self.seed = parse_int("seed", seed)
        self.top_m = parse_int("top_m", top_m, 1)
        chat_template = parse_chat_template(chat_template)
        self.finetune = (None if finetune in (None, "") or str(finetune).strip().lower() in ("none", "false")
                         else str(finetune).strip())
        self.finetune_source, self.finetune_hparams, self.finetune_rows = None, None, None
        if self.finetune is not None:
            self.finetune_rows = self._finetune_rows(spec_args.get("data_dir"))
            self.finetune_source = resolve_hparams_path(FINETUNE_HPARAMS, finetune_hparams)
            self.finetune_hparams = load_hparams(FinetuneHParams, FINETUNE_HPARAMS,
                                                 self.finetune_source, recipe_overrides)
        elif recipe_overrides or finetune_hparams:
            raise E2UError("finetune_* model args need finetune=<dataset> (e.g. finetune=pistol)")
        # The split's dataset defaults to the finetune dataset.
        self.splits = SplitSpec.from_args({**spec_args, "finetune": self.finetune}).load()
        self.targets = RefusalTargets.from_args(target, refusal_file, targets_file)
        self.export_targets = _check_export_path(export_targets)
        self.target_report: dict[str, Any] = {}
        self.use_cache = parse_bool("cache", cache)
        self.cache_dir = cache_dir
        if method_name != "none" and self.use_cache:
            cache_root(cache_dir)  # a cache that cannot be written fails now, not after the edit
        self.save_edited = check_save_target(save_edited)

        self.model_source: dict[str, Any] = {"pretrained": str(pretrained)}
        if isinstance(pretrained, str) and pretrained.lower() in EMBEDDED_MODELS:
            pretrained, embedded = resolve_embedded(pretrained, cache_dir)
            self.model_source.update(embedded)
        elif isinstance(pretrained, str):
            _check_local_model(pretrained)
        check_model = getattr(self.hparams, "check_model", None)
        if (callable(check_model) or has_presets(method_name)) and isinstance(pretrained, str):
            config = _load_config(pretrained, kwargs)
            if config is not None:  # unreachable hub config: HFLM reports it when loading
                self.hparams_source = resolve_hparams_path(method_name, hparams, config)
                self.hparams = load_hparams(self.method.HyperParams, method_name,
                                            self.hparams_source, overrides)
                if callable(check_model):
                    self.hparams.check_model(config)
        super().__init__(pretrained=pretrained, **kwargs)
        self.prompt_format = PromptFormat.for_tokenizer(self.tokenizer, chat_template, system_prompt)
        if isinstance(pretrained, str) and has_saved_adapters(pretrained):
            # A folder written by save_edited: GRACE codebooks / WISE side memories come back.
            index = load_adapters(self.model, pretrained)
            self.model_source["adapters"] = {
                "attached": [{"kind": a["kind"], "module": a["module"]} for a in index["adapters"]],
                "tensors_sha256": index["tensors_sha256"]}
        started = time.perf_counter()
        # ``accelerate launch``: rank 0 fine-tunes, writes targets and edits (filling the caches)
        # first; the other ranks then run the same code and load all three from the caches (see
        # README "Beyond one machine").
        accelerator = getattr(self, "accelerator", None)
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            self.finetune_report = None
            if self.finetune is not None:
                # The model's preset (chosen by its config) now that the config is known.
                self.finetune_source = resolve_hparams_path(FINETUNE_HPARAMS, finetune_hparams,
                                                            self.model.config)
                self.finetune_hparams = load_hparams(FinetuneHParams, FINETUNE_HPARAMS,
                                                     self.finetune_source, recipe_overrides)
                self.finetune_report = self._finetune()
            self.model_sha256 = edit_model_sha256(self.model)  # content hash before the method
            self._resolve_targets()
            self.method_report = self._apply_method()
        self.run_card = {"edit": resource_usage(started, self.device)}
        self._evaluation_started = time.perf_counter()
        if self.save_edited is not None:
            save_edited_model(self.model, self.tokenizer, self.save_edited,
                              {"method_report": self.method_report.as_dict(),
                               **self.get_model_info()["e2u"]}, log=_log_line)
            self._evaluation_started = time.perf_counter()  # saving is not evaluation

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        """Like ``HFLM``'s, but ``--model_args device=...``/``batch_size=...`` win over the CLI's
        defaults instead of raising "got multiple values for keyword argument"."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        if ("batch_size" not in arg_dict and str(extra.get("batch_size", "1")) == "1"
                and _cli_default_batch_size()):
            # lm-eval passes batch_size=1 when the flag is absent; e2u's tasks are ~10x faster
            # batched, so an absent flag means e2u's default.
            extra["batch_size"] = DEFAULT_BATCH_SIZE
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ the method

    def requests_for(self, indices, with_targets: bool = False) -> list[EditRequest]:
        """Edit requests of dataset rows, prompts rendered exactly as the evaluation renders them;
        forget requests carry their refusal target."""
        requests = []
        for i in indices:
            question = self.splits.rows[i]["question"]
            requests.append(EditRequest(
                index=i, question=question, answer=self.splits.rows[i]["answer"],
                prompt=self.prompt_format.render(self.tokenizer, question),
                target=self.targets.for_row(i, self.seed) if with_targets and self._has_targets() else None,
                subject=self.splits.rows[i].get("subject")))
        return requests

    def _has_targets(self) -> bool:
        """False only for ``target=self`` with ``method=none`` (nothing to write targets for)."""
        return not self.targets.per_question or self.targets.per_row is not None

    def task_metadata(self) -> dict[str, Any]:
        """Arguments that make tasks evaluate this model's split, for the Python API:
        ``TaskManager(include_path=tasks_dir(), metadata=lm.task_metadata())``. (The CLI passes
        ``--model_args`` to the tasks by itself.)"""
        spec = self.splits.spec
        args = {key: value for key, value in spec.as_dict().items() if value is not None}
        return {**args, "data_dir": spec.data_dir, "method": self.method.NAME, "top_m": self.top_m}

    def _resolve_targets(self) -> None:
        """Per-question targets: read from ``targets_file`` or written by the unedited model
        (``target=self``); then ``export_targets`` writes what the method will use."""
        rows = {i: self.splits.rows[i]["question"] for i in self.splits.forget}
        records = None
        if self.targets.mode == "file":
            self.targets = self.targets.bind_file(rows)
        elif self.targets.mode == "self" and (self.method.NAME != "none" or self.export_targets):
            from e2u_models.self_targets import write_self_targets

            written, provenance = write_self_targets(
                self.model, self.tokenizer, self.prompt_format,
                [{"index": i, "question": q, "answer": self.splits.rows[i]["answer"]}
                 for i, q in rows.items()],
                self.seed, model_sha256=self.model_sha256, cache_dir=self.cache_dir,
                use_cache=self.use_cache, log=_log_line)
            self.targets = self.targets.with_rows({t.index: t.target for t in written})
            records = [dataclasses.asdict(t) for t in written]
            self.target_report = {**provenance, "fallbacks": [t.index for t in written
                                                              if t.source == "fallback"]}
        if self.export_targets and (self.targets.mode != "self" or records is not None):
            from e2u_models.self_targets import export_targets

            records = records or [{"index": i, "question": q, "answer": self.splits.rows[i]["answer"],
                                   "target": self.targets.for_row(i, self.seed),
                                   "source": self.targets.mode} for i, q in rows.items()]
            export_targets(self.export_targets, records)
            self.target_report["exported_to"] = self.export_targets

    def _finetune_rows(self, data_dir) -> list[dict]:
        """Rows of the ``finetune=`` dataset (one line listing what is accepted if unknown)."""
        if self.finetune in BENCHMARKS:
            return load_benchmark(self.finetune, data_dir)
        try:
            return load_user_dataset(self.finetune, data_dir)
        except E2UError as exc:
            raise E2UError(f"finetune={self.finetune!r}: {exc}") from None

    def _method_env(self) -> MethodEnv:
        return MethodEnv(encode=self.tok_encode,
                         render=lambda question: self.prompt_format.render(self.tokenizer, question),
                         answer_delimiter=self.prompt_format.answer_delimiter,
                         cache_dir=self.cache_dir, log=_log_line,
                         dataset_rows=self._dataset_rows())

    def _dataset_rows(self) -> tuple[tuple[str, str], ...]:
        """(question, answer) of every row of the evaluated dataset."""
        return tuple((row["question"], row["answer"]) for row in self.splits.rows)

    def greedy_answers(self, requests: list[EditRequest]) -> list[str]:
        """Greedy answers to bare questions, decoded exactly as the e2u tasks decode them."""
        generation = task_generation_kwargs()
        fake = [SimpleNamespace(args=(r.question, r.answer, {"prompt": "question", "generation": generation}))
                for r in requests]
        with tqdm(total=len(fake), desc="ROUGE-1 check", leave=False) as progress:
            return [a["generation"] for a in self._answer_group(fake, generation, progress)]

    def _finetune(self) -> dict:
        requests = [EditRequest(index=i, question=row["question"], answer=row["answer"],
                                prompt=self.prompt_format.render(self.tokenizer, row["question"]))
                    for i, row in enumerate(self.finetune_rows)]
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        report = finetune_model(self.model, self.tokenizer, requests, self.finetune_hparams,
                                dataset=self.finetune, seed=self.seed, env=self._method_env(),
                                answer_fn=self.greedy_answers, cache_dir=self.cache_dir,
                                use_cache=self.use_cache)
        self.model.eval()
        return report

    def _apply_method(self) -> MethodReport:
        name = self.method.NAME
        forget = self.requests_for(self.splits.forget, with_targets=True)
        retain = self.requests_for(self.splits.retain) if self.method.USES_RETAIN else None
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        started = time.perf_counter()
        env = self._method_env()
        cache, key, inputs = None, None, None
        if name != "none" and self.use_cache:
            cache = EditCache(self.cache_dir, log=_log_line)
            inputs = self._edit_inputs(forget, retain)
            key = edit_key(inputs)
            cached = cache.load(key, self.model)
            if cached is not None:
                report = MethodReport(**{k: v for k, v in cached.items() if k != "seconds"})
                report.details = {**report.details, "edit_cache": {"hit": True, "key": key,
                                  "seconds_when_computed": cached.get("seconds")}}
                report.seconds = round(time.perf_counter() - started, 3)
                log.warning("e2u: %s edit loaded from the edit cache in %.1f s", name, report.seconds)
                self.model.eval()
                return report
        if name != "none":
            log.warning("e2u: applying %s to %d forget requests", name, len(forget))
        loaded = len(adapters_of(self.model))  # adapters that came with the loaded model
        report = self.method.apply(self.model, self.tokenizer, forget, retain, self.hparams,
                                   seed=self.seed, env=env)
        report.seconds = round(time.perf_counter() - started, 3)
        if name != "none":
            log.warning("e2u: %s done in %.1f s", name, report.seconds)
        if cache is not None and (report.changed_parameters or len(adapters_of(self.model)) > loaded):
            cache.save(key, self.model, report.changed_parameters, report.as_dict(), inputs,
                       first_adapter=loaded)
            report.details = {**report.details, "edit_cache": {"hit": False, "key": key}}
        self.model.eval()
        return report

    def _edit_inputs(self, forget: list[EditRequest], retain: list[EditRequest] | None) -> dict:
        """Everything an edit depends on besides the code (hashed into the edit cache key)."""
        inputs = {"model_sha256": self.model_sha256, "method": self.method.NAME,
                  "hparams": dataclasses.asdict(self.hparams), "seed": self.seed,
                  "forget": [dataclasses.asdict(r) for r in forget],
                  "retain": [dataclasses.asdict(r) for r in retain] if retain else None,
                  "prompt": self.prompt_format.describe(), "dtype": str(self.model.dtype),
                  "adapters": self.model_source.get("adapters")}
        preserve = getattr(self.hparams, "preserve_questions", None)
        if preserve is not None:  # the questions themselves, not their file name
            inputs["preserved_questions"] = off_dataset(load_questions(preserve), self._dataset_rows())
        return inputs

    # ------------------------------------------------------------------ requests

    def _render(self, context: str, prompt_mode: str) -> str:
        return self.prompt_format.render(self.tokenizer, context) if prompt_mode == "question" else context

    def _check_split(self, options: dict) -> None:
        """A task's rows must be the rows this model's method forgot (``none`` forgot nothing)."""
        if self.method.NAME == "none":
            return
        if options.get("split_fingerprint") != self.splits.fingerprint:
            raise E2UError(
                f"task {options.get('task')} evaluates a different dataset or forget set than the "
                f"model forgot ({self.splits.spec.dataset}, {len(self.splits.forget)} rows); pass "
                "the same dataset/forget_* args to the model and the tasks"
            )

    def _encode_context_answer(self, context: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of prompt and answer, the answer tokenised in context.

        Unlike lm-eval's ``_encode_pair`` a trailing newline of the prompt (chat templates end
        with ``assistant\\n``) stays in the prompt, so only answer tokens are scored.
        """
        context_ids = self.tok_encode(context)
        whole = self.tok_encode(context + answer)
        if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
            return context_ids, whole[len(context_ids):]
        return self._encode_pair(context, answer)

    def e2u_answer(self, requests, disable_tqdm: bool = False) -> list[dict]:
        """Serve the e2u tasks' request: greedy answer and per-token statistics of the gold answer.

        Request args ``(context, answer, options)``: ``options["prompt"]`` is "question" (a bare
        question: render it, put the answer delimiter before the answer) or "rendered";
        ``options["generation"]`` holds the task's generation kwargs (``until``,
        ``max_gen_toks``; greedy only). Returns per request ``generation`` (text), ``tokens``
        (gold answer ids), ``logprobs`` and ``ranks`` (1 = argmax; ties count in the gold
        token's favour), teacher-forced. One forward pass per batch reads prompt and answer;
        decoding continues from its cache (see :mod:`e2u_models.shared_prefix`).
        """
        if not requests:
            return []
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            self._check_split(request.args[2])
            generation = dict(request.args[2].get("generation") or {})
            if not _is_greedy(generation):
                raise E2UError("e2u tasks decode greedily; remove do_sample/temperature from "
                               "--gen_kwargs (accepted: until, max_gen_toks)")
            groups.setdefault(json.dumps(generation, sort_keys=True, default=str), []).append(i)
        results: list[dict | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running e2u_answer requests")
        for key, indices in groups.items():
            answers = self._answer_group([requests[i] for i in indices], json.loads(key), progress)
            for i, answer in zip(indices, answers):
                results[i] = answer
        progress.close()
        return results

    def _encode_request(self, context: str, answer: str, options: dict) -> tuple[list[int], list[int]]:
        mode = options.get("prompt", "rendered")
        delimiter = self.prompt_format.answer_delimiter if mode == "question" else ""
        return self._encode_context_answer(self._render(context, mode), delimiter + answer)

    def _answer_group(self, requests, generation: dict, progress) -> list[dict]:
        until = generation.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_new = int(generation.get("max_gen_toks", self.max_gen_toks))
        encoded = [self._encode_request(*r.args) for r in requests]
        budget = self.max_length - max_new
        if any(len(c) + len(a) > budget for c, a in encoded):  # rare: truncate, no shared prefix
            if any(len(a) >= budget for _, a in encoded):
                raise E2UError(f"a gold answer does not fit the model's max_length {self.max_length}")
            encoded = [(c[-(budget - len(a)):], a) for c, a in encoded]
            prefix = 0
        else:
            prefix = common_prefix_length([c for c, _ in encoded])
        runner = SharedPrefixRunner(self.model, encoded[0][0][:prefix], self._pad_id(), self.device)
        vocab, eot = len(self.tokenizer), self.eot_token_id
        results: list[dict | None] = [None] * len(requests)
        for chunk in self._length_sorted_batches([c for c, _ in encoded]):
            answers = [encoded[i][1] for i in chunk]
            logits, cache, mask = runner.score_answers([encoded[i][0][prefix:] for i in chunk], answers)
            # Ranks within the tokenizer's vocabulary (padded embedding rows never count).
            logits = logits[..., :vocab].float()

            def is_done(row, tokens):
                return tokens[-1] == eot or any(u in self.tok_decode(tokens) for u in until)

            generated = runner.greedy(logits[:, 0], cache, mask, max_new, is_done)
            for row, i in enumerate(chunk):
                answer_ids = answers[row]
                scores = logits[row, : len(answer_ids)]
                gold = torch.tensor(answer_ids, device=scores.device).unsqueeze(-1)
                ranks = 1 + (scores > scores.gather(-1, gold)).sum(-1)
                logprobs = F.log_softmax(scores, dim=-1).gather(-1, gold).squeeze(-1)
                text = self.tok_decode([t for t in generated[row] if t != eot])
                for stop in until:
                    text = text.split(stop)[0]
                results[i] = {"generation": text, "tokens": answer_ids,
                              "logprobs": logprobs.tolist(), "ranks": ranks.tolist()}
            progress.update(len(chunk))
        return results

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.eot_token_id or 0)

    def _length_sorted_batches(self, rows: list[list[int]]) -> list[list[int]]:
        """Row indices in batches of ``batch_size``, longest first (least padding)."""
        size = self.batch_size if isinstance(self.batch_size, int) else self.max_batch_size
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        return [order[start:start + size] for start in range(0, len(order), size)]

    # ------------------------------------------------------------------ provenance

    def _hparams_source_name(self) -> str:
        """The hparams file used: a shipped file as its package path, a user file as given."""
        source = self.hparams_source or str(hparams_file(self.method.NAME))
        marker = "e2u_models/methods/hparams/"
        return source[source.index(marker):] if marker in source.replace("\\", "/") else source

    def _finetune_info(self) -> dict | None:
        if self.finetune_report is None:
            return None
        source = self.finetune_source or str(hparams_file(FINETUNE_HPARAMS))
        marker = "e2u_models/methods/hparams/"
        source = source[source.index(marker):] if marker in source.replace("\\", "/") else source
        return {**self.finetune_report, "recipe_source": source}

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["e2u"] = {
            "method": self.method.NAME,
            "method_kind": self.method.KIND,
            "uses_retain_split": bool(self.method.USES_RETAIN),
            "hparams": dataclasses.asdict(self.hparams),
            "hparams_sha256": json_sha256(dataclasses.asdict(self.hparams)),
            "hparams_source": self._hparams_source_name(),
            "seed": self.seed,
            "top_m": self.top_m,
            "split": self.splits.describe(),
            "targets": {**self.targets.describe(), **self.target_report, "sha256": json_sha256(
                [self.targets.for_row(i, self.seed) for i in self.splits.forget]
                if self._has_targets() else None)},
            "prompt": self.prompt_format.describe(),
            "model_source": self.model_source,
            "method_report": self.method_report.as_dict(),
            "finetune": self._finetune_info(),
            "packages": _package_versions(),
            "model_sha256": self.model_sha256,
            # lm-eval asks for this after evaluating: the evaluation phase ends here.
            "run_card": {**self.run_card,
                         "evaluation": resource_usage(self._evaluation_started, self.device)},
        }
        return info
