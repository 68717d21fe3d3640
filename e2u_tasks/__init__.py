"""What e2u evaluates: benchmark data by hub id, the forget/retain/rephrase split spec shared with
the model, the metrics and the lm-eval task class. Nothing here depends on how a model is edited."""

from e2u_tasks.errors import E2UError

__all__ = ["E2UError"]
