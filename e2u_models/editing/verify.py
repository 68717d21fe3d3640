"""After an edit: the target's NLL per request and the verification report; finiteness checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from e2u_models.editing.requests import PreparedRequest
from e2u_models.nethook import pad_id_of
from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length
from e2u_tasks.errors import E2UError


@torch.no_grad()
def target_nll(model, tokenizer, prepared: Sequence[PreparedRequest], batch_size: int = 16) -> list[float]:
    """Mean per-token NLL of each request's target after its bare prompt (the edit's check);
    the prompts' common prefix (the chat template) is computed once."""
    if not prepared:
        return []
    device = next(model.parameters()).device
    rows = [p.nll_rows(i)[0] for i, p in enumerate(prepared)]
    prompts = [row.ids[: row.label_start + 1] for row in rows]
    prefix = common_prefix_length(prompts)
    runner = SharedPrefixRunner(model, prompts[0][:prefix], pad_id_of(tokenizer), device)
    result = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        scored = runner.score_answers([p[prefix:] for p in prompts[start: start + batch_size]],
                                      [row.labels for row in chunk], for_decoding=False)
        for b, row in enumerate(chunk):
            labels = torch.tensor(row.labels, device=device)
            result.append(float(torch.nn.functional.cross_entropy(scored.answer_logits(b).float(), labels)))
        del scored  # this batch's logits and cache are not held through the next batch's forward
    return result


def verification(before: list[float], after: list[float], prepared: Sequence[PreparedRequest],
                 verify_nll: float, weight_changes: dict[str, float], log) -> dict:
    """Per request target NLL before/after and whether it was reached; never hides a failure."""
    per_request = []
    unreached = []
    for p, b, a in zip(prepared, before, after):
        reached = a <= verify_nll
        entry = {"index": p.request.index, "target": p.request.target, "nll_before": round(b, 4),
                 "nll_after": round(a, 4), "reached": reached}
        if p.request.merged_indices:
            entry["merged_indices"] = list(p.request.merged_indices)
        per_request.append(entry)
        if not reached:
            unreached.append(p.request.index)
    if unreached:
        log(f"e2u: {len(unreached)} of {len(prepared)} edit request(s) did not reach their target "
            f"(NLL > {verify_nll}): rows {unreached}")
    return {"requests": per_request, "unreached": unreached, "verify_nll": verify_nll,
            "weight_change_norms": {k: round(v, 6) for k, v in weight_changes.items()},
            "mean_nll_before": round(sum(before) / max(len(before), 1), 4),
            "mean_nll_after": round(sum(after) / max(len(after), 1), 4)}


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise E2UError(f"{what} is not finite (NaN/inf); the model was left unedited")


def targets_reached(method_report: dict) -> dict | None:
    """``{"reached": n, "requests": m}`` of an editor's own verification (target NLL after the
    edit); None for methods that do not verify (training methods, ``none``).

    For ROME, MEMIT and AlphaEdit also ``v_star_reached``: requests whose v* loss ended at or below
    the same threshold. That loss is the target NLL under v* plus its KL and weight-decay terms
    (never below the NLL), so it counts what the optimisation reached; ``reached`` counts what the
    weight update then realised. The two differ when the update is kept lighter than v* asks
    (L2, the covariance weight λ, the null space) or later edits undo earlier ones (ROME)."""
    details = method_report.get("details") or {}
    verification = details.get("verification") or {}
    requests = verification.get("requests")
    if not requests:
        return None
    reach = {"reached": sum(1 for r in requests if r.get("reached")), "requests": len(requests)}
    losses = (details.get("v_star") or {}).get("final_losses")
    threshold = verification.get("verify_nll")
    if losses and threshold is not None:
        reach["v_star_reached"] = sum(1 for loss in losses if loss <= threshold)
    return reach
