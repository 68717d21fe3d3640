"""Time the tofu_factual (or pistol) evaluation on the embedded SmolLM2-135M-Instruct.

Prints model load time, evaluation wall time, generated tokens and tokens/s, and peak memory
(RSS). With ``--baseline`` it also times, in the same process on the same prompts, the stock
lm-eval path (``hf``'s ``generate_until`` plus a separate teacher-forced scoring pass, batch size
as given) and prints the speed-up ratio of e2u's one-pass shared-prefix path.

    python benchmarks/eval_speed.py [--group tofu_factual] [--limit N] [--batch-size 64] [--baseline]

lm-eval's own task index (~15-20 s for its ~10k built-in YAMLs in the CLI) is not included: the
tasks are loaded from e2u's folder only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", default="tofu_factual", choices=["tofu_factual", "pistol"])
    parser.add_argument("--limit", type=int, default=None, help="docs per subtask (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline", action="store_true",
                        help="also time the stock hf generate_until + scoring path")
    args = parser.parse_args()
    os.environ.setdefault("E2U_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir
    from e2u_models.model import E2ULM

    started = time.perf_counter()
    lm = E2ULM(pretrained="smollm2-135m-instruct", method="none", device="cpu",
               batch_size=args.batch_size, dataset=args.group)
    load_seconds = time.perf_counter() - started

    manager = TaskManager(include_defaults=False, include_path=tasks_dir())
    started = time.perf_counter()
    result = simple_evaluate(model=lm, tasks=[args.group], task_manager=manager, limit=args.limit,
                             log_samples=True)
    eval_seconds = time.perf_counter() - started
    answers = [s["resps"][0][0] for samples in result["samples"].values() for s in samples]
    generated = sum(len(lm.tok_encode(a["generation"])) for a in answers)
    composite = result["groups"][args.group]["composite,none"]
    figures = {
        "group": args.group, "docs": len(answers), "batch_size": args.batch_size,
        "threads": __import__("torch").get_num_threads(),
        "model_load_s": round(load_seconds, 2), "eval_wall_s": round(eval_seconds, 2),
        "generated_tokens": generated, "generated_tokens_per_s": round(generated / eval_seconds, 1),
        "composite": round(composite, 4), "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if args.baseline:
        figures.update(baseline(lm, result, args.batch_size, eval_seconds))
    print(json.dumps(figures, indent=2))


def baseline(lm, result, batch_size: int, e2u_seconds: float) -> dict:
    """The same answers through lm-eval's stock machinery: ``HFLM.generate_until`` on rendered
    prompts, then one scoring forward per batch (prompt computed twice, no shared prefix)."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from e2u_models.nethook import pad_id_of

    docs = [(s["doc"], s["arguments"]) for samples in result["samples"].values() for s in samples]
    prompts = [lm.prompt_format.render(lm.tokenizer, doc["question"]) for doc, _ in docs]
    gen_kwargs = {"until": ["\n\n", "\nQuestion:"], "do_sample": False, "max_gen_toks": 32}
    started = time.perf_counter()
    texts = HFLM.generate_until(lm, [Instance("generate_until", {}, (p, dict(gen_kwargs)), 0)
                                     for p in prompts], disable_tqdm=True)
    pad = pad_id_of(lm.tokenizer, lm.eot_token_id)
    for start in range(0, len(docs), batch_size):
        chunk = [lm._encode_context_answer(p, d["answer"])
                 for p, (d, _) in zip(prompts[start:start + batch_size], docs[start:start + batch_size])]
        rows = [(c + a)[:-1] for c, a in chunk]
        width = max(map(len, rows))
        batch = torch.full((len(rows), width), pad)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
        lm._model_call(batch)
    seconds = time.perf_counter() - started
    same = sum(t == s["resps"][0][0]["generation"]
               for t, s in zip(texts, (s for v in result["samples"].values() for s in v)))
    return {"baseline_wall_s": round(seconds, 2),
            "speedup_e2u_vs_baseline": round(seconds / e2u_seconds, 2),
            "baseline_identical_generations": f"{same}/{len(texts)}"}


if __name__ == "__main__":
    main()
