"""What the logit lens adds to the evaluation: tofu_factual timed with and without it, side by side.

One model load, then the same evaluation alternately with ``lens=false`` and ``lens=true`` (the
tasks' model arg), ``--repeats`` times each; the fastest run of each counts. Prints both times, the
ratio and the overhead, and checks that every metric other than the lens's is identical. Wall time
and the process's CPU time (all threads) are both reported; on a machine shared with other jobs
neither is steady (run it on an idle one, with enough ``--repeats``). So it also times the lens
itself (the seconds inside :func:`e2u_models.logit_lens.lens_best`, the largest over the repeats)
and gives their share of the evaluation without it (``lens_inside_percent``), which does not
depend on how steady the machine is.

    python benchmarks/lens_cost.py                                   # tiny random llama (seconds)
    python benchmarks/lens_cost.py --model smollm2-135m-instruct     # the embedded model

The tiny model (built in code, the test suite's tokenizer) checks the path and gives a rough
ratio; its vocabulary and depth differ from real models', so only the embedded model's ratio
answers the question.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TINY = "tiny"


def tiny_model(folder: str, layers: int) -> str:
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class LensClock:
    """Seconds spent inside the lens itself (:func:`e2u_models.logit_lens.lens_best`) during one
    evaluation: on a busy machine the run-to-run spread of the whole evaluation can exceed the
    lens's share, this figure is what the lens adds to it."""

    def __init__(self) -> None:
        import e2u_models.model as model_module

        self.seconds, self.module, self.lens_best = 0.0, model_module, model_module.lens_best

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self.lens_best(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        model_module.lens_best = timed


def evaluate(lm, lens: bool, limit: int | None) -> tuple[float, float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir

    manager = TaskManager(include_defaults=False, include_path=tasks_dir(),
                          metadata={**lm.task_metadata(), "lens": lens})
    started, cpu_started = time.perf_counter(), time.process_time()
    result = simple_evaluate(model=lm, tasks=["tofu_factual"], task_manager=manager, limit=limit,
                             bootstrap_iters=0)
    return time.perf_counter() - started, time.process_time() - cpu_started, result["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help=f"{TINY} (default) or a model e2u loads, "
                        "e.g. smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny model")
    parser.add_argument("--limit", type=int, default=None, help="docs per subtask (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("E2U_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import torch

    from e2u_models.model import E2ULM

    with tempfile.TemporaryDirectory() as folder:
        pretrained = tiny_model(folder, args.layers) if args.model == TINY else args.model
        lm = E2ULM(pretrained=pretrained, method="none", device="cpu", batch_size=args.batch_size)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        results: dict[bool, dict] = {}
        clock, inside = LensClock(), []
        for _ in range(args.repeats):
            for lens in (False, True):
                clock.seconds = 0.0
                took, took_cpu, results[lens] = evaluate(lm, lens, args.limit)
                if lens:
                    inside.append(clock.seconds)
                seconds[lens].append(took)
                cpu[lens].append(took_cpu)
                print(f"lens={str(lens).lower()}: {took:.2f} s wall, {took_cpu:.2f} s CPU",
                      file=sys.stderr, flush=True)
    plain = {task: {k: v for k, v in row.items() if not k.startswith("lens_")}
             for task, row in results[False].items()}
    with_lens = {task: {k: v for k, v in row.items() if not k.startswith("lens_")}
                 for task, row in results[True].items()}
    off, on = min(seconds[False]), min(seconds[True])
    cpu_off, cpu_on = min(cpu[False]), min(cpu[True])
    print(json.dumps({
        "model": args.model if args.model != TINY else f"tiny random llama, {args.layers} layers",
        "task": "tofu_factual", "limit": args.limit, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "eval_s_without_lens": round(off, 2), "eval_s_with_lens": round(on, 2),
        "ratio": round(on / off, 3), "overhead_percent": round(100 * (on / off - 1), 1),
        "lens_s_inside": round(max(inside), 2),
        "lens_inside_percent": round(100 * max(inside) / off, 1),
        "cpu_s_without_lens": round(cpu_off, 2), "cpu_s_with_lens": round(cpu_on, 2),
        "cpu_ratio": round(cpu_on / cpu_off, 3), "cpu_overhead_percent": round(100 * (cpu_on / cpu_off - 1), 1),
        "other_metrics_identical": plain == with_lens,
        "lens_metrics_forget": {k: v for k, v in results[True].get("tofu_forget", {}).items()
                                if k.startswith("lens_") and "_stderr" not in k},
    }, indent=2))


if __name__ == "__main__":
    main()
