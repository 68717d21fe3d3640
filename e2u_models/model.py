"""The ``e2u`` lm-eval model: an ``HFLM`` that applies an unlearning method before evaluating.

Like lm-eval's ``steered`` model it changes the network once at construction and then evaluates
like ``hf``, so the edited model also runs any other lm-eval task in the same command. On top of
``hf`` it serves the ``e2u_answer`` request type (greedy answer plus per-token log-probabilities
and ranks of the gold answer) that the e2u tasks need, and renders bare questions with :class:`~e2u_models.prompts.PromptFormat` so the
evaluation prompt is exactly the prompt a method edited.

The model args are checked in :mod:`e2u_models.args`, the model is changed by
:func:`e2u_models.pipeline.prepare` and the run card is written by :mod:`e2u_models.provenance`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from e2u_models.args import E2UArgs, parse_model_args
from e2u_models.editing.adapters import has_saved_adapters, load_adapters
from e2u_models.embedded import DEFAULT_MODEL
from e2u_models.logit_lens import lens_best, token_ranks
from e2u_models.nethook import pad_id_of
from e2u_models.pipeline import Prepared, Runtime, edit_requests, method_env, prepare
from e2u_models.prompts import PromptFormat
from e2u_models.protocol import EditRequest, MethodEnv
from e2u_models.provenance import e2u_info, environment_fingerprint, resource_usage
from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length
from e2u_models.terminal import DEFAULT_BATCH_SIZE
from e2u_tasks.errors import E2UError

@dataclass(frozen=True)
class AnswerQuery:
    """One answer to serve: ``context`` (a bare question or a rendered prompt, as
    ``options["prompt"]`` says), the gold ``answer`` and the task's ``options``; an lm-eval
    request's ``args`` in that order."""

    context: str
    answer: str
    options: dict


def distinct_queries(queries: list[AnswerQuery]) -> tuple[list[AnswerQuery], list[int]]:
    """The distinct queries (first occurrence order) and, per query, the position of the one
    that serves it. Two tasks may ask the same question (``pistol_retain`` and its parts
    ``pistol_retain_adjacent``/``_far``): it is answered once, so the parts cost nothing and
    the answers are the same bits whichever tasks run together."""
    first: dict[tuple, int] = {}
    distinct: list[AnswerQuery] = []
    served_by = []
    for query in queries:
        key = (query.context, query.answer, query.options.get("prompt", "rendered"))
        if key not in first:
            first[key] = len(distinct)
            distinct.append(query)
        served_by.append(first[key])
    return distinct, served_by


def _is_greedy(gen_kwargs: dict) -> bool:
    return not gen_kwargs.get("do_sample") and not float(gen_kwargs.get("temperature") or 0.0)


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


@register_model("e2u")
class E2ULM(HFLM):
    """``--model e2u --model_args pretrained=...,method=...,<split args>,<hparam overrides>``
    (the accepted args: :mod:`e2u_models.args`)."""

    def __init__(self, pretrained: Any = DEFAULT_MODEL, **model_args: Any) -> None:
        # Every argument is checked, and the hparams resolved against the model's config, before
        # HFLM loads the weights: a bad argument costs no model load.
        self.args: E2UArgs = parse_model_args(pretrained, **model_args)
        # Plain attributes, not properties: every request reads them (and tests stand in a method).
        self.method, self.splits = self.args.method, self.args.splits
        # e2u's default batch size also where no command line adds it (lm-eval's Python API):
        # the same numbers as the `lm_eval --model e2u` command, at its speed.
        super().__init__(pretrained=self.args.pretrained,
                         **{"batch_size": DEFAULT_BATCH_SIZE, **self.args.hf_args})
        self.prompt_format = PromptFormat.for_tokenizer(self.tokenizer, self.args.chat_template,
                                                        self.args.system_prompt)
        self.model_source = {**self.args.model_source, **self._saved_adapters(self.args.pretrained)}
        accelerator = getattr(self, "accelerator", None)
        self._runtime = Runtime(
            prompt_format=self.prompt_format, encode=self.tok_encode, answer_fn=self.greedy_answers,
            model_source=self.model_source, device=self.device,
            main_process_first=accelerator.main_process_first if accelerator is not None else contextlib.nullcontext)
        self.prepared: Prepared = prepare(self.model, self.tokenizer, self.args, self._runtime)
        # known_only=true chose the split among the rows the model knows
        self.args, self.splits = self.prepared.args, self.prepared.args.splits
        self.run_card = {"edit": self.prepared.edit_usage}
        self._evaluation_started = time.perf_counter()  # saving (a step of prepare) is not evaluation

    def _saved_adapters(self, pretrained: Any) -> dict[str, Any]:
        """A folder written by save_edited: its GRACE codebooks / WISE side memories come back."""
        if not (isinstance(pretrained, str) and has_saved_adapters(pretrained)):
            return {}
        index = load_adapters(self.model, pretrained)
        return {"adapters": {
            "attached": [{"kind": a["kind"], "module": a["module"]} for a in index["adapters"]],
            "tensors_sha256": index["tensors_sha256"]}}

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        """Like ``HFLM``'s, but ``--model_args device=...``/``batch_size=...`` win over the CLI's
        defaults instead of raising "got multiple values for keyword argument"."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ what prepare did

    @property
    def hparams(self) -> Any:
        return self.args.hparams.values

    @property
    def seed(self) -> int:
        return self.args.seed

    @property
    def top_m(self) -> int:
        return self.args.top_m

    @property
    def targets(self):
        return self.prepared.targets

    @property
    def method_report(self):
        return self.prepared.method_report

    @property
    def finetune_report(self) -> dict | None:
        return self.prepared.finetune_report

    @property
    def model_sha256(self) -> str | None:
        return self.prepared.model_sha256

    def requests_for(self, indices, with_targets: bool = False) -> list[EditRequest]:
        """Edit requests of dataset rows, prompts rendered exactly as the evaluation renders them;
        forget requests carry their refusal target."""
        return edit_requests(self.tokenizer, self.args, self._runtime, self.prepared, indices, with_targets)

    def task_metadata(self) -> dict[str, Any]:
        """Arguments that make tasks evaluate this model's split, for the Python API:
        ``TaskManager(include_path=tasks_dir(), metadata=lm.task_metadata())``. (The CLI passes
        ``--model_args`` to the tasks by itself.)"""
        spec = self.splits.spec
        args = {key: value for key, value in spec.as_dict().items() if value is not None}
        return {**args, "data_dir": spec.data_dir, "method": self.method.NAME, "top_m": self.top_m,
                "lens": self.args.lens, "lens_k": self.args.lens_k}

    def _method_env(self) -> MethodEnv:
        return method_env(self.tokenizer, self.args, self._runtime)

    def greedy_answers(self, requests: list[EditRequest]) -> list[str]:
        """Greedy answers to bare questions, decoded exactly as the e2u tasks decode them."""
        generation = task_generation_kwargs()
        queries = [AnswerQuery(r.question, r.answer, {"prompt": "question", "generation": generation})
                   for r in requests]
        with tqdm(total=len(queries), desc="ROUGE-1 check", leave=False) as progress:
            return [a["generation"] for a in self._answer_group(queries, generation, progress)]

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
        token's favour), teacher-forced; with ``options["lens"]`` also ``lens_rank``, the best rank
        of the answer's first token through the logit lens over the layers, and ``lens_layer``,
        the layer that gives it (:mod:`e2u_models.logit_lens`). One
        forward pass per batch reads prompt and answer; decoding continues from its cache (see
        :mod:`e2u_models.shared_prefix`).
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
        distinct = {key: distinct_queries([AnswerQuery(*requests[i].args) for i in indices])
                    for key, indices in groups.items()}
        results: list[dict | None] = [None] * len(requests)
        progress = tqdm(total=sum(len(queries) for queries, _ in distinct.values()),
                        disable=disable_tqdm or self.rank != 0, desc="Running e2u_answer requests")
        for key, indices in groups.items():
            queries, served_by = distinct[key]
            answers = self._answer_group(queries, json.loads(key), progress)
            for i, position in zip(indices, served_by):
                results[i] = dict(answers[position])
        progress.close()
        return results

    def _encode_request(self, query: AnswerQuery) -> tuple[list[int], list[int]]:
        mode = query.options.get("prompt", "rendered")
        delimiter = self.prompt_format.answer_delimiter if mode == "question" else ""
        return self._encode_context_answer(self._render(query.context, mode), delimiter + query.answer)

    def _answer_group(self, queries: list[AnswerQuery], generation: dict, progress) -> list[dict]:
        """Answers to ``queries`` that share one generation setting (one shared-prefix runner)."""
        until = generation.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_new = int(generation.get("max_gen_toks", self.max_gen_toks))
        encoded = [self._encode_request(q) for q in queries]
        budget = self.max_length - max_new
        if any(len(c) + len(a) > budget for c, a in encoded):  # rare: truncate, no shared prefix
            if any(len(a) >= budget for _, a in encoded):
                raise E2UError(f"a gold answer does not fit the model's max_length {self.max_length}")
            encoded = [(c[-(budget - len(a)):], a) for c, a in encoded]
            prefix = 0
        else:
            prefix = common_prefix_length([c for c, _ in encoded])
        runner = SharedPrefixRunner(self.model, encoded[0][0][:prefix], pad_id_of(self.tokenizer, self.eot_token_id), self.device)
        vocab, eot = len(self.tokenizer), self.eot_token_id
        lens = any(q.options.get("lens") for q in queries)
        results: list[dict | None] = [None] * len(queries)
        for chunk in self._length_sorted_batches([len(c) + len(a) for c, a in encoded]):
            answers = [encoded[i][1] for i in chunk]
            prompts = [encoded[i][0][prefix:] for i in chunk]
            scored = runner.score_answers(prompts, answers, hidden_states=lens)
            # Ranks within the tokenizer's vocabulary (padded embedding rows never count).
            first_logits = scored.first_logits()[..., :vocab]
            lens_rank = lens_layer = None
            if lens:  # the gold answer's first token through every layer, at the prompt's last token
                first = torch.tensor([a[0] for a in answers], device=first_logits.device)
                lens_rank, lens_layer = (t.tolist() for t in lens_best(
                    self.model, scored.hidden_states, scored.prompt_ends, first_logits, first, vocab))
                scored.hidden_states = None

            def is_done(row, tokens):
                return tokens[-1] == eot or any(u in self.tok_decode(tokens) for u in until)

            # The gold answers' ranks and log-probabilities first: then the batch's answer logits
            # (rows × longest answer × vocabulary) are released before decoding builds its cache.
            teacher_forced = []
            for row, answer_ids in enumerate(answers):
                scores = scored.answer_logits(row)[..., :vocab].float()
                gold = torch.tensor(answer_ids, device=scores.device)
                teacher_forced.append((F.log_softmax(scores, dim=-1).gather(-1, gold[:, None]).squeeze(-1).tolist(),
                                       token_ranks(scores, gold).tolist()))
            scored.logits = None
            generated = runner.greedy(first_logits, scored.cache, scored.mask, max_new, is_done)
            for row, i in enumerate(chunk):
                text = self.tok_decode([t for t in generated[row] if t != eot])
                for stop in until:
                    text = text.split(stop)[0]
                logprobs, ranks = teacher_forced[row]
                results[i] = {"generation": text, "tokens": answers[row], "logprobs": logprobs, "ranks": ranks}
                if lens_rank is not None:
                    results[i].update(lens_rank=lens_rank[row], lens_layer=lens_layer[row])
            # The decoding cache (still holding the rows that ran to the token cap) and the first
            # logits are not held through the next batch's forward.
            del scored, first_logits, generated
            progress.update(len(chunk))
        return results

    def _length_sorted_batches(self, lengths: list[int]) -> list[list[int]]:
        """Row indices, longest first, in batches of at most ``batch_size`` rows and of equal size
        up to one row (least padding, and no short last batch decoding almost alone)."""
        size = self.batch_size if isinstance(self.batch_size, int) else self.max_batch_size
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches = -(-len(order) // size)
        return [order[b * len(order) // batches:(b + 1) * len(order) // batches] for b in range(batches)]

    # ------------------------------------------------------------------ provenance

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        # lm-eval asks for this after evaluating: the evaluation phase ends here.
        run_card = {**self.run_card, "evaluation": resource_usage(self._evaluation_started, self.device)}
        info["e2u"] = e2u_info(self.args, self.prepared, self.prompt_format, self.model_source, run_card,
                               environment_fingerprint(self.device, self.model.dtype))
        # The rows per batch decide the last bits of the teacher-forced numbers; lm-eval's own
        # config says None when its Python API passed no size.
        info["e2u"]["batch_size"] = self.batch_size
        return info
