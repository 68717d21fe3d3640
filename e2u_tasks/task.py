"""The one task class behind every e2u task YAML.

Each document yields two requests:
- ``token_stats`` (idx 0, a custom request type the ``e2u`` model serves): per-token
  log-probabilities and ranks of the gold answer, teacher-forced, for ``prob``/``mrr``/``hit_rate``;
- ``generate_until`` (idx 1): the greedy answer, for ``rouge1_recall``.

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

from e2u_tasks.metrics import DEFAULT_TOP_M, METRIC_NAMES, composite_share, item_metrics
from e2u_tasks.requests import PROMPT_KEY, TOKEN_STATS
from e2u_tasks.splits import SPLIT_NAMES, SplitSpec, parse_int


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
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"task {self.config.task}: e2u_split must be one of {SPLIT_NAMES}")
        self.top_m = parse_int("top_m", (self.config.metadata or {}).get("top_m", DEFAULT_TOP_M), 1)
        lower_is_better = self.split in ("forget", "rephrase")
        names = list(METRIC_NAMES) + (["composite"] if self.split != "rephrase" else [])
        self._metric_fn_list = {name: None for name in names}
        self._metric_fn_kwargs = {name: {} for name in names}
        self._aggregation_list = {name: mean for name in names}
        self._higher_is_better = {name: not lower_is_better for name in METRIC_NAMES}
        if self.split != "rephrase":
            self._higher_is_better["composite"] = True

    def construct_requests(self, doc: dict, ctx: str, **kwargs: Any) -> list[Instance]:
        rendered = bool(kwargs.pop("apply_chat_template", False))
        kwargs.pop("chat_template", None)
        prompt = "rendered" if rendered else "question"
        options = {"prompt": prompt, "split_fingerprint": doc["split_fingerprint"],
                   "task": self.config.task}
        gen_kwargs = deepcopy(self.config.generation_kwargs) or {}
        gen_kwargs[PROMPT_KEY] = prompt
        return [
            Instance(request_type=TOKEN_STATS, doc=doc, arguments=(ctx, doc["answer"], options),
                     idx=0, **kwargs),
            Instance(request_type="generate_until", doc=doc, arguments=(ctx, gen_kwargs),
                     idx=1, **kwargs),
        ]

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        stats, generation = results
        values = item_metrics(doc["answer"], generation, stats["logprobs"], stats["ranks"],
                              self.top_m)
        share = composite_share(self.split, values["rouge1_recall"])
        if share is not None:
            values["composite"] = share
        return values
