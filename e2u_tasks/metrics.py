"""Per-item unlearning metrics: pure functions of strings and per-token statistics.

Definitions (see README "Metrics"): with the gold answer tokens a_1..a_T scored teacher-forced
after the prompt,
- ``rouge1_recall``: ROUGE-1 recall of the gold answer in the greedy generation (rouge-score,
  Porter stemming);
- ``prob``: exp(-(1/T) sum_t NLL_t), the geometric-mean token probability;
- ``mrr``: (1/T) sum_t 1/rank_t, rank_t = 1 + number of vocabulary entries with a strictly
  greater logit than a_t (ties count in the token's favour);
- ``hit_rate``: (1/T) sum_t [rank_t <= m], m = 100 by default.

Logit lens (the answer's first token a_1, read after every decoder layer l = 1..L at the prompt's
last position through the final norm and the output head; best_rank = min_l rank_l(a_1)):
- ``lens_mrr``: 1 / best_rank;
- ``lens_hit@k``: [best_rank <= k], k = 10 by default (``lens_k``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from e2u_tasks.errors import E2UError

DEFAULT_TOP_M = 100
METRIC_NAMES = ("rouge1_recall", "prob", "mrr", "hit_rate")
DEFAULT_LENS_K = 10


def rouge1_scorer():
    """The ROUGE-1 scorer (Porter stemming). Building one costs ~10 ms: reuse it across items."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(reference: str, prediction: str, scorer=None) -> float:
    """Share of the reference's unigrams (stemmed, clipped counts) found in the prediction."""
    scorer = scorer or rouge1_scorer()
    return float(scorer.score(target=reference, prediction=prediction)["rouge1"].recall)


def _check_stats(logprobs: Sequence[float], ranks: Sequence[int]) -> None:
    if not logprobs or len(logprobs) != len(ranks):
        raise E2UError("token statistics need one log-probability and one rank per answer token "
                       f"(got {len(logprobs)} and {len(ranks)})")


def answer_probability(logprobs: Sequence[float]) -> float:
    """exp of the mean token log-probability (length-normalised answer probability)."""
    _check_stats(logprobs, logprobs)
    return math.exp(sum(logprobs) / len(logprobs))


def mean_reciprocal_rank(ranks: Sequence[int]) -> float:
    _check_stats(ranks, ranks)
    return sum(1.0 / r for r in ranks) / len(ranks)


def hit_rate(ranks: Sequence[int], top_m: int = DEFAULT_TOP_M) -> float:
    """Share of answer tokens ranked within the top ``top_m``."""
    _check_stats(ranks, ranks)
    if top_m < 1:
        raise E2UError(f"top_m={top_m} is out of range: it must be >= 1")
    return sum(1 for r in ranks if r <= top_m) / len(ranks)


def item_metrics(answer: str, generation: str, logprobs: Sequence[float], ranks: Sequence[int],
                 top_m: int = DEFAULT_TOP_M, scorer=None) -> dict[str, float]:
    """All four metrics of one item."""
    _check_stats(logprobs, ranks)
    return {
        "rouge1_recall": rouge1_recall(answer, generation, scorer),
        "prob": answer_probability(logprobs),
        "mrr": mean_reciprocal_rank(ranks),
        "hit_rate": hit_rate(ranks, top_m),
    }


def lens_hit_name(k: int) -> str:
    return f"lens_hit@{k}"


def lens_metrics(best_rank: int, k: int = DEFAULT_LENS_K) -> dict[str, float]:
    """The logit-lens metrics of one item from the first answer token's best rank over the layers."""
    if best_rank < 1:
        raise E2UError(f"the logit lens needs a rank >= 1 (got {best_rank})")
    if k < 1:
        raise E2UError(f"lens_k={k} is out of range: it must be >= 1")
    return {"lens_mrr": 1.0 / best_rank, lens_hit_name(k): float(best_rank <= k)}


def composite_share(split: str, rouge1: float) -> float | None:
    """This item's contribution to the composite S = (1 - R1@forget) + R1@retain.

    Each split reports twice its half of S, so that the unweighted mean over the forget and retain
    tasks (what an lm-eval group computes) is exactly S. Rephrase items take no part.
    """
    if split == "forget":
        return 2.0 * (1.0 - rouge1)
    if split == "retain":
        return 2.0 * rouge1
    return None
