"""The null space of preserved keys (AlphaEdit, Fang et al. 2025): updates projected onto it leave
the outputs at those keys unchanged. Shared by AlphaEdit and WISE's optional projection."""

from __future__ import annotations

import torch

from e2u_tasks.errors import E2UError


def check_null_space_hparams(threshold: float, rule: str) -> None:
    if not threshold > 0:
        raise E2UError(f"hparam nullspace_threshold={threshold} must be > 0")
    if rule not in ("absolute", "relative"):
        raise E2UError(f"hparam nullspace_rule={rule!r} is not accepted; use absolute or relative")


def null_space_projector(moment: torch.Tensor, threshold: float, rule: str) -> tuple[torch.Tensor, int]:
    """P onto the span of C's eigenvectors with small eigenvalues, and its dimension."""
    values, vectors = torch.linalg.eigh(moment.double())
    cut = threshold * values.max() if rule == "relative" else threshold
    kept = vectors[:, values < cut]
    return kept @ kept.T, int(kept.shape[1])
