"""Device parity of the editors' first steps on SmolLM2: the target NLL before the edit and v*.

On one NVIDIA H200 (torch 2.11.0+cu130, transformers 5.17.0) the editors' own check reported a
higher target NLL before any edit than on the CPU (the first forget request of `known_facts`
seed 100: 3.67 against 2.98), and v* ended higher (MEMIT preset: mean loss 1.09 against 0.63),
while the evaluation of the unedited model agreed to 1e-6 (design notes, "The editors on dev
splits"). This script localises that in one process, on the same prepared requests and weights,
on the CPU and (when there is one) on CUDA:

  * the first request's prompt and target token ids (in the JSON: a tokenizer difference shows);
  * the target NLL through the editors' check (`target_nll`, the shared-prefix runner, batches of
    16) and through a plain forward of each row alone (no cache, no padding);
  * the same check again after each step an edit takes before its own check: a cold statistics
    pass (the preset's layers, ``--stats-tokens`` tokens, an empty cache of its own) and v*, so a
    step that leaves the model computing differently shows as a change between the stages;
  * v* (`optimise_targets`, fast engine) for a few steps: the final losses.

On the CPU the model is the one the product loaded; on CUDA both a copy moved there and, with
``--product-load``, the model the product loads with ``device=cuda`` (as `lm_eval --device cuda`
does). With torch 2.11.0 on the CPU the figures equal torch 2.13.0's (design notes), so the
H200's difference comes with CUDA.

    python benchmarks/device_edit_parity.py --json parity.json        # CPU, and CUDA if present
    python benchmarks/device_edit_parity.py --forget-size 4 --steps 2 --stats-tokens 2000  # quick

Prints each device's mean of every figure, then the largest differences between the paths,
stages and devices; ``--json`` writes every value.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_nll(model, prepared) -> list[float]:
    """Each request's target NLL from one unpadded forward over its bare prompt and target."""
    import torch

    device = next(model.parameters()).device
    result = []
    with torch.no_grad():
        for i, request in enumerate(prepared):
            row = request.nll_rows(i)[0]
            ids = torch.tensor([row.ids[: row.label_start + len(row.labels)]], device=device)
            logits = model(input_ids=ids).logits[0].float()
            start = row.label_start
            picked = logits[start: start + len(row.labels)]
            result.append(float(torch.nn.functional.cross_entropy(picked, torch.tensor(row.labels, device=device))))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="known_facts")
    parser.add_argument("--forget-size", type=int, default=40)
    parser.add_argument("--forget-seed", type=int, default=100)
    parser.add_argument("--method", default="memit", help="whose preset prepares the requests")
    parser.add_argument("--steps", type=int, default=5, help="v* steps on each device")
    parser.add_argument("--stats-tokens", type=int, default=20_000,
                        help="tokens of the cold statistics pass between the checks")
    parser.add_argument("--product-load", action="store_true",
                        help="on CUDA also the model as the product loads it with device=cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import tempfile

    import torch

    from e2u_models.architectures import with_architecture
    from e2u_models.editing.requests import KeySpec, merge_requests, prepare_requests
    from e2u_models.editing.stats import StatsSpec, statistics_for
    from e2u_models.editing.verify import target_nll
    from e2u_models.editing.vstar import VStarSettings, optimise_targets
    from e2u_models.hparams import load_hparams, resolve_hparams_path
    from e2u_models.methods import get_method
    from e2u_models.model import E2ULM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm = E2ULM(pretrained=args.pretrained, method="none", dataset=args.dataset, forget_size=args.forget_size,
               forget_seed=args.forget_seed, seed=args.forget_seed, device="cpu")
    model, tokenizer = lm.model, lm.tokenizer
    forget = lm.requests_for(lm.splits.forget, with_targets=True)
    method = get_method(args.method)
    hparams = load_hparams(method.HyperParams, args.method, resolve_hparams_path(args.method, None, model.config),
                           {"v_num_grad_steps": args.steps})
    hparams = with_architecture(hparams, model)
    env = dataclasses.replace(lm._method_env(), log=lambda *_: None)
    prepared = prepare_requests(model, tokenizer, merge_requests(forget, hparams.merge, env.render),
                                KeySpec.of(hparams), env, seed=args.forget_seed, originals=forget)
    layers = hparams.resolved_layers(model.config.num_hidden_layers)
    layer = layers[-1]
    module = hparams.layer_module_tmp.format(layer)
    first = prepared[0].nll_rows(0)[0]
    record = {"torch": torch.__version__, "requests": len(prepared),
              "first_request": {"prompt_ids": first.ids[: first.label_start + 1], "labels": first.labels},
              "devices": {}}
    stats_spec = dataclasses.replace(StatsSpec.of(hparams), mom2_n_tokens=args.stats_tokens)

    def staged(on_device, name):
        """The check fresh, after a cold statistics pass and after v*; v*'s final losses."""
        figures = {"target_nll": target_nll(on_device, tokenizer, prepared),
                   "plain_nll": plain_nll(on_device, prepared)}
        with tempfile.TemporaryDirectory() as cache_dir:
            statistics_for(on_device, tokenizer, stats_spec, layers, dataclasses.replace(env, cache_dir=cache_dir))
        figures["target_nll_after_statistics"] = target_nll(on_device, tokenizer, prepared)
        vstar = optimise_targets(on_device, tokenizer, prepared, VStarSettings.of(hparams), layer, module,
                                 desc=f"v* {name}")
        figures["target_nll_after_vstar"] = target_nll(on_device, tokenizer, prepared)
        figures["vstar_final_losses"] = vstar.losses
        record["devices"][name] = figures
        means = {k: round(sum(v) / len(v), 4) for k, v in figures.items()}
        print(json.dumps({"device": name, **means}), flush=True)

    staged(model, "cpu")
    if torch.cuda.is_available():
        staged(copy.deepcopy(model).to("cuda"), "cuda")
        if args.product_load:
            loaded = E2ULM(pretrained=args.pretrained, method="none", dataset=args.dataset,
                           forget_size=args.forget_size, forget_seed=args.forget_seed, seed=args.forget_seed,
                           device="cuda")
            staged(loaded.model, "cuda (product load)")
    cpu = record["devices"]["cpu"]

    def largest(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    differences = {"cpu: target_nll vs plain_nll": largest(cpu["target_nll"], cpu["plain_nll"])}
    for name, figures in record["devices"].items():
        for stage in ("target_nll_after_statistics", "target_nll_after_vstar"):
            differences[f"{name}: target_nll vs {stage}"] = largest(figures["target_nll"], figures[stage])
        if name != "cpu":
            for key in ("target_nll", "plain_nll", "vstar_final_losses"):
                differences[f"cpu vs {name}: {key}"] = largest(cpu[key], figures[key])
    record["largest_differences"] = {k: round(v, 6) for k, v in differences.items()}
    print(json.dumps(record["largest_differences"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
