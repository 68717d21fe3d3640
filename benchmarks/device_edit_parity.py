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
  * v* (`optimise_targets`, fast engine) for a few steps: the final losses.

    python benchmarks/device_edit_parity.py --json parity.json        # CPU, and CUDA if present
    python benchmarks/device_edit_parity.py --forget-size 4 --steps 2  # quick

Prints each device's means of the three, then the largest differences between the paths and
devices; ``--json`` writes every value.
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
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from e2u_models.architectures import with_architecture
    from e2u_models.editing.requests import KeySpec, merge_requests, prepare_requests
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
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        on_device = model if device == "cpu" else copy.deepcopy(model).to(device)
        settings = VStarSettings.of(hparams)
        vstar = optimise_targets(on_device, tokenizer, prepared, settings, layer, module, desc=f"v* {device}")
        figures = {"target_nll": target_nll(on_device, tokenizer, prepared),
                   "plain_nll": plain_nll(on_device, prepared),
                   "vstar_final_losses": vstar.losses}
        record["devices"][device] = figures
        means = {k: round(sum(v) / len(v), 4) for k, v in figures.items()}
        print(json.dumps({"device": device, **means}), flush=True)
    cpu = record["devices"]["cpu"]
    differences = {"cpu: target_nll vs plain_nll": max(abs(a - b) for a, b in zip(cpu["target_nll"], cpu["plain_nll"]))}
    if "cuda" in record["devices"]:
        cuda = record["devices"]["cuda"]
        for key in ("target_nll", "plain_nll", "vstar_final_losses"):
            differences[f"cpu vs cuda: {key}"] = max(abs(a - b) for a, b in zip(cpu[key], cuda[key]))
    record["largest_differences"] = {k: round(v, 6) for k, v in differences.items()}
    print(json.dumps(record["largest_differences"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
