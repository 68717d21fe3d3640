"""Edit-speed benchmark of ROME, MEMIT and AlphaEdit on TOFU-factual forget requests.

For each method, side by side in one process and on the same requests:
  * statistics time on first use in this run (cold: the run starts with an empty statistics cache;
    a method whose layers an earlier method already covered finds some of them cached) and
    cached (a second request);
  * edit time with the statistics cached (v* optimisation, solves, verification), fast v* mode;
  * the v* optimisation alone in ``fast`` and in ``classic`` mode (one request at a time, full
    forward passes, full-vocabulary logits) from the same unedited weights, and their ratio;
  * peak resident memory.

    python benchmarks/edit_speed.py                       # SmolLM2-135M, 40 forget facts
    python benchmarks/edit_speed.py --methods alphaedit --forget-size 10 --steps 5
    python benchmarks/edit_speed.py --methods alphaedit --stats-cache ~/.cache/e2u   # stats cached

Prints one table; ``--json <file>`` also writes the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="smollm2-135m-instruct")
    parser.add_argument("--methods", default="rome,memit,alphaedit")
    parser.add_argument("--forget-size", type=int, default=40)
    parser.add_argument("--steps", type=int, default=None, help="v_num_grad_steps (default: preset)")
    parser.add_argument("--no-classic", action="store_true", help="skip the classic-mode timing")
    parser.add_argument("--json", default=None)
    parser.add_argument("--stats-cache", default=None,
                        help="use this cache folder for the statistics (e.g. ~/.cache/e2u) instead "
                             "of a fresh one, to skip the cold collection")
    args = parser.parse_args()

    import torch

    from e2u_models.methods import get_method
    from e2u_models.hparams import load_hparams, resolve_hparams_path
    from e2u_models.editing.requests import KeySpec, merge_requests, prepare_requests
    from e2u_models.editing.stats import StatsSpec, statistics_for
    from e2u_models.editing.vstar import VStarSettings, optimise_targets
    from e2u_models.model import E2ULM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm = E2ULM(pretrained=args.pretrained, method="none", forget_size=args.forget_size, device="cpu")
    model, tokenizer = lm.model, lm.tokenizer
    forget = lm.requests_for(lm.splits.forget, with_targets=True)
    rows = []
    stats_dir = os.path.expanduser(args.stats_cache) if args.stats_cache else tempfile.mkdtemp(prefix="e2u-bench-stats-")
    for name in args.methods.split(","):
        method = get_method(name)
        overrides = {"v_num_grad_steps": args.steps} if args.steps else {}
        hparams = load_hparams(method.HyperParams, name, resolve_hparams_path(name, None, model.config), overrides)
        layers = hparams.resolved_layers(model.config.num_hidden_layers)
        row = {"method": name, "requests": len(forget), "layers": layers}
        env = dataclasses.replace(lm._method_env(), cache_dir=stats_dir, log=lambda *_: None)
        needs_stats = name != "rome" or hparams.mom2_adjustment
        for label in ("stats_first_s", "stats_cached_s"):
            started = time.perf_counter()
            if needs_stats:
                statistics_for(model, tokenizer, StatsSpec.of(hparams), layers, env)
            row[label] = round(time.perf_counter() - started, 2)
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        started = time.perf_counter()
        report = method.apply(model, tokenizer, forget, None, hparams, seed=0, env=env)
        row["edit_s"] = round(time.perf_counter() - started, 2)
        row["unreached"] = len(report.details["verification"]["unreached"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        # v* alone, both engines, same requests, same unedited weights.
        prepared = prepare_requests(model, tokenizer, merge_requests(forget, hparams.merge, env.render),
                                    KeySpec.of(hparams), env, seed=0, originals=forget)
        layer = layers[0] if name == "rome" else layers[-1]
        module = (hparams.rewrite_module_tmp if name == "rome" else hparams.layer_module_tmp).format(layer)
        modes = ("fast",) if args.no_classic else ("fast", "classic")
        for mode in modes:
            settings = dataclasses.replace(VStarSettings.of(hparams), mode=mode)
            started = time.perf_counter()
            if name == "rome":  # ROME optimises one request at a time in both modes
                for request in prepared:
                    optimise_targets(model, tokenizer, [request], settings, layer, module)
            else:
                optimise_targets(model, tokenizer, prepared, settings, layer, module)
            row[f"vstar_{mode}_s"] = round(time.perf_counter() - started, 2)
        if not args.no_classic:
            row["classic_over_fast"] = round(row["vstar_classic_s"] / row["vstar_fast_s"], 2)
        row["peak_rss_gib"] = round(peak_rss_gib(), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.stats_cache:
        shutil.rmtree(stats_dir, ignore_errors=True)
    columns = ["method", "requests", "stats_first_s", "stats_cached_s", "edit_s", "vstar_fast_s",
               "vstar_classic_s", "classic_over_fast", "unreached", "peak_rss_gib"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
