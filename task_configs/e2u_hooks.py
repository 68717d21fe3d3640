"""Target of the YAMLs' ``!function e2u_hooks.<name>``: lm-eval loads ``!function`` modules by
file path next to the YAML, so this shim re-exports the real objects from ``e2u_tasks``."""

from e2u_tasks.general_mc import load_general_mc
from e2u_tasks.task import UnlearningTask, load_split

__all__ = ["UnlearningTask", "load_general_mc", "load_split"]
