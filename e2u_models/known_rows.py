"""``known_only=true``: which rows the unedited model knows, judged once and cached.

The model answers every row of the dataset (question, and paraphrase when there is one) with the
tasks' own greedy decoding, and :func:`e2u_tasks.known.judge_rows` applies the one rule
(:data:`e2u_tasks.known.KNOWN_RULE`). The verdicts are cached like the other pre-edit stages: a
verified folder keyed by the model's content hash, the rows, the rule's code, the prompt format
and the decoding settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from e2u_models.cache import atomic_directory, cache_root, json_sha256, verified_entry
from e2u_models.protocol import EditRequest
from e2u_tasks.known import KNOWN_RULE, judge_rows


def known_rows(rows: Sequence[dict], answer_fn: Callable[[list[EditRequest]], list[str]], *,
               model_sha256: str, prompt: dict, generation: dict, cache_dir: str | None = None,
               use_cache: bool = True, log=print,
               check: Callable[[tuple[int, ...]], Any] | None = None) -> tuple[Any, dict]:
    """Indices of the rows the model answers correctly (or what ``check`` makes of them), and
    provenance (rule, cache key and hit). ``check`` runs before the verdicts are cached, so a
    known set it refuses (too few rows) leaves no cache entry behind."""
    from e2u_models.edit_cache import code_sha256

    key = json_sha256({"model": model_sha256, "rule": KNOWN_RULE, "code": code_sha256("e2u_tasks.known"),
                       "rows": [[r["question"], r["answer"], r.get("paraphrase")] for r in rows],
                       "prompt": prompt, "generation": generation})
    folder = cache_root(cache_dir) / "known" / key if use_cache else None
    hit = folder is not None and verified_entry(folder, log, "known-rows cache entry")
    if hit:
        verdicts = json.loads((folder / "known.json").read_text(encoding="utf-8"))
        log(f"e2u: known rows loaded from the cache ({sum(v['known'] for v in verdicts)} of {len(rows)})")
    else:
        log(f"e2u: the unedited model answers all {len(rows)} rows to find the ones it knows")

        def answer(asked: list[tuple[int, str, str]]) -> list[str]:
            return answer_fn([EditRequest(index=i, question=q, prompt="", answer=a) for i, q, a in asked])

        verdicts = judge_rows(rows, answer)
        log(f"e2u: the model knows {sum(v['known'] for v in verdicts)} of {len(rows)} rows")
    known = tuple(v["index"] for v in verdicts if v["known"])
    result = check(known) if check is not None else known
    if folder is not None and not hit:
        with atomic_directory(folder) as tmp:
            (tmp / "known.json").write_text(json.dumps(verdicts, ensure_ascii=False, indent=1),
                                            encoding="utf-8")
    return result, {"rule": KNOWN_RULE, "cache_key": key, "cache_hit": hit}
