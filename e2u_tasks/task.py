"""The one task class behind every e2u task YAML.

Each document yields one request of the custom type ``e2u_answer``, which the ``e2u`` model
serves (lm-eval's stock types cannot return per-token ranks): the greedy answer, for
``rouge1_recall``, and the per-token log-probabilities and ranks of the gold answer,
teacher-forced, for ``prob``/``mrr``/``hit_rate``, and the first answer token's rank after every
layer (the logit lens) for ``lens_mrr``/``lens_hit@k``. Generation settings are the task's
``generation_kwargs`` (``--gen_kwargs`` applies), passed along in the request.

The context is the bare question. The model renders it (chat template when it has one, else a
``Question: ... Answer:`` completion prompt), so that evaluation and editing see the same prompt;
with lm-eval's ``--apply_chat_template`` the context arrives rendered and the model uses it as is.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from datasets import Dataset, DatasetDict
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from e2u_tasks.metrics import (DEFAULT_LENS_K, DEFAULT_TOP_M, METRIC_NAMES, composite_share,
                               item_metrics, lens_hit_name, lens_metrics, rouge1_scorer)
from e2u_tasks.refusal import REFUSAL_METRIC_NAMES, refusal_metrics
from e2u_tasks.requests import E2U_ANSWER
from e2u_tasks.splits import TASK_SPLITS, SplitSpec, parse_bool, parse_int


def load_split(e2u_split: str, e2u_benchmark: str | None = None, **metadata: Any) -> DatasetDict:
    """``custom_dataset`` hook: lm-eval calls it with the task's metadata, which on the CLI holds
    the ``--model_args``; the same :class:`SplitSpec` the model built decides the rows."""
    splits = SplitSpec.for_task(e2u_benchmark, metadata).load()
    return DatasetDict({"test": Dataset.from_list(splits.docs(e2u_split))})


class UnlearningTask(ConfigurableTask):
    """forget / retain / rephrase evaluation of one dataset (split named in ``dataset_kwargs``)."""

    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        # lm-eval's task factory passes the YAML dict including the ``class`` key itself.
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)
        self.split = self.config.dataset_kwargs["e2u_split"]
        if self.split not in TASK_SPLITS:
            raise ValueError(f"task {self.config.task}: e2u_split must be one of {TASK_SPLITS}")
        self.rouge = rouge1_scorer()
        metadata = self.config.metadata or {}
        self.top_m = parse_int("top_m", metadata.get("top_m", DEFAULT_TOP_M), 1)
        # the logit lens (model args lens, lens_k; on by default)
        self.lens_k = (parse_int("lens_k", metadata.get("lens_k", DEFAULT_LENS_K), 1)
                       if parse_bool("lens", metadata.get("lens", True)) else None)
        lower_is_better = self.split in ("forget", "rephrase")
        # Only forget and retain carry the composite: the group's composite is the mean over
        # the tasks that report it, so the rephrase task and the retain parts stay out of it.
        with_composite = self.split in ("forget", "retain")
        lens_names = ["lens_mrr", lens_hit_name(self.lens_k)] if self.lens_k else []
        names = (list(METRIC_NAMES) + list(REFUSAL_METRIC_NAMES) + lens_names
                 + (["composite"] if with_composite else []))
        self._metric_fn_list = {name: None for name in names}
        self._metric_fn_kwargs = {name: {} for name in names}
        self._aggregation_list = {name: mean for name in names}
        # Forgotten rows should refuse, name the entity and not leak; retain rows the opposite
        # (refusal_rate on retain is over-refusal, answer_leak there means a correct answer).
        self._higher_is_better = {name: not lower_is_better for name in METRIC_NAMES}
        self._higher_is_better.update(refusal_rate=lower_is_better, entity_mention=True,
                                      answer_leak=not lower_is_better)
        # a forgotten answer should not be readable at any layer either
        self._higher_is_better.update({name: not lower_is_better for name in lens_names})
        if with_composite:
            self._higher_is_better["composite"] = True

    def construct_requests(self, doc: dict, ctx: str, **kwargs: Any) -> Instance:
        rendered = bool(kwargs.pop("apply_chat_template", False))
        kwargs.pop("chat_template", None)
        options = {"prompt": "rendered" if rendered else "question",
                   "generation": deepcopy(self.config.generation_kwargs) or {},
                   "split_fingerprint": doc["split_fingerprint"], "task": self.config.task}
        if self.lens_k:
            options["lens"] = True
        return Instance(request_type=E2U_ANSWER, doc=doc, arguments=(ctx, doc["answer"], options),
                        idx=0, **kwargs)

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        (answer,) = results
        values = item_metrics(doc["answer"], answer["generation"], answer["logprobs"],
                              answer["ranks"], self.top_m, self.rouge)
        values.update(refusal_metrics(doc["question"], doc["answer"], answer["generation"]))
        if self.lens_k:
            values.update(lens_metrics(answer["lens_rank"], self.lens_k))
        share = composite_share(self.split, values["rouge1_recall"])
        if share is not None:
            values["composite"] = share
        return values
