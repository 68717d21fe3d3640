"""What the ``lm_eval`` console script prints around e2u's tasks, made true for them.

Imported by the start-up hook (:mod:`e2u_models.autoload`) only when the interpreter runs the
lm-eval CLI; the results files are never changed. Import-light (``logging``): it runs before lm-eval.

- **Batch size.** e2u's tasks are much faster batched, so an ``lm_eval --model e2u`` command
  without ``--batch_size`` runs with e2u's default; the flag is added to the command line before
  lm-eval reads it, so lm-eval's printed ``batch_size`` and its results record the size used.
- **Warnings that do not apply to e2u's tasks** are dropped: "Custom kwargs can be passed to
  --metadata" (e2u's splits come from the model args, see docs/tasks-and-metrics.md); a group's
  ``composite`` "missing" in its rephrase task (by design: the composite reads forget and retain
  only); inconsistent ``higher_is_better`` within a group (forget and retain point opposite ways by
  design). lm-eval's "chat template is not applied" becomes one line saying that it concerns
  other tasks only: e2u renders the chat template of its own tasks itself (``chat_template``).
- **Per-task composite rows.** A forget or retain task's ``composite`` is its share of the
  group's composite (the group averages them), not a result of its own; the printed table shows
  ``composite`` on groups only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

DEFAULT_BATCH_SIZE = 64
_COMPOSITE = "composite"
CHAT_TEMPLATE_NOTE = (
    "lm-eval: apply_chat_template is off; this concerns non-e2u tasks only: e2u's tasks render the "
    "model's chat template themselves (model arg chat_template=auto|none|<file>)")


def with_default_batch_size(args: Sequence[str]) -> list[str] | None:
    """The CLI arguments (without the program) with ``--batch_size 64`` after ``--model e2u``
    when neither a batch size nor a config file is given; None when nothing changes."""
    args = list(args)
    if any(a in ("--batch_size", "--config", "-C") or a.startswith(("--batch_size=", "--config="))
           or _model_args_name_batch_size(a) for a in args):  # a flag, a model arg or a config
        return None
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args) and args[i + 1] == "e2u":
            return [*args[:i + 2], "--batch_size", str(DEFAULT_BATCH_SIZE), *args[i + 2:]]
        if arg == "--model=e2u":
            return [*args[:i + 1], "--batch_size", str(DEFAULT_BATCH_SIZE), *args[i + 1:]]
    return None


def _model_args_name_batch_size(arg: str) -> bool:
    """``batch_size`` as a key of a ``key=value,...`` or JSON ``--model_args`` string (not
    ``edit_batch_size`` or ``train_batch_size``)."""
    if '"batch_size"' in arg:
        return True
    return any(item.split("=", 1)[0].strip() == "batch_size" for item in arg.split(",") if "=" in item)


class E2UWarnings(logging.Filter):
    """Drops lm-eval's warnings that do not apply to e2u's tasks (see the module docstring)."""

    def __init__(self, e2u_names: set[str]) -> None:
        super().__init__()
        self.e2u_names = e2u_names

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is lm-eval's to print
            return True
        if "chat template is not applied" in message:
            record.msg, record.args = CHAT_TEMPLATE_NOTE, ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        if "Custom kwargs can be passed to `--metadata`" in message:
            return message.split(":", 1)[0] not in self.e2u_names
        if message.startswith("Group '") and f"metric '{_COMPOSITE}," in message:
            return message.split("'")[1] not in self.e2u_names
        if message.startswith("Higher_is_better values for metric") and " in group " in message:
            group = message.split(" in group ", 1)[1].split(" ", 1)[0]
            return group not in self.e2u_names
        return True


# The lm-eval loggers that emit the warnings above (filters do not propagate to child loggers).
LM_EVAL_LOGGERS = ("lm_eval.evaluator", "lm_eval.api.task", "lm_eval.api.group", "lm_eval.evaluator_utils")


def install_warning_filter(e2u_names: set[str]) -> None:
    for name in LM_EVAL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, E2UWarnings) for f in logger.filters):
            logger.addFilter(E2UWarnings(e2u_names))


def without_composite_parts(make_table: Callable, e2u_names: set[str]) -> Callable:
    """``make_table`` that leaves out the ``composite`` rows of e2u's tasks (not groups)."""

    def table(result_dict, column: str = "results", sort_results: bool = False):
        groups = set(result_dict.get("group_subtasks") or {})
        rows = result_dict.get(column) or {}
        hidden = {task for task in rows if task in e2u_names and task not in groups}
        if column == "results" and hidden:
            result_dict = {**result_dict, column: {
                task: ({k: v for k, v in metrics.items() if k.split(",", 1)[0] not in
                        (_COMPOSITE, f"{_COMPOSITE}_stderr")} if task in hidden else metrics)
                for task, metrics in rows.items()}}
        return make_table(result_dict, column, sort_results)

    table._e2u_hooked = True
    return table
