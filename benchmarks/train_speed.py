"""Training-step speed of the unlearning/fine-tuning loop on SmolLM2-135M, side by side.

Times optimizer-free training steps (forward + backward of the token-mean NLL of the answers, the
fine-tuning loss) on the same batches of a dataset's QA rows, three ways in one process:

  * ``all layers``: every parameter trained, the whole model run (``train_from_layer=0``);
  * ``upper, left-padded``: ``train_from_layer=k``, lower layers' output cached, each row's whole
    sequence through layers k.. (the previous release's path);
  * ``upper, shared prefix``: as above, but the rows' common prefix (the chat template) runs once.

    python benchmarks/train_speed.py [--dataset pistol] [--from-layer 15] [--batch 8] [--steps 6]

Prints seconds per step (median), tokens per second and the ratios, and the largest difference
between the shared-prefix and left-padded losses (they compute the same function).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="pistol", choices=["pistol", "tofu_factual"])
    parser.add_argument("--from-layer", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("E2U_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from e2u_models.protocol import EditRequest
    from e2u_models.training.lower_stack import FrozenLowerStack
    from e2u_models.training.hparams import TrainHParams
    from e2u_models.training.loop import full_trainable
    from e2u_models.training.batching import collate, examples_of
    from e2u_models.training.losses import nll
    from e2u_models.model import E2ULM
    from e2u_tasks.data import load_benchmark

    lm = E2ULM(pretrained=args.pretrained, method="none", dataset=args.dataset, device="cpu")
    model, tokenizer = lm.model, lm.tokenizer
    rows = load_benchmark(args.dataset, os.environ["E2U_DATA_DIR"])
    picks = random.Random(args.seed).sample(range(len(rows)), args.batch * args.steps)
    requests = [EditRequest(index=i, question=rows[i]["question"], answer=rows[i]["answer"],
                            prompt=lm.prompt_format.render(tokenizer, rows[i]["question"])) for i in picks]
    examples = examples_of(tokenizer, lm._method_env(), requests, TrainHParams())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [collate(examples[i:i + args.batch], pad, model.device)
               for i in range(0, len(examples), args.batch)]
    tokens = sum(b.tokens for b in batches) / len(batches)
    model.train()

    def timed(network, trainable) -> tuple[float, list[float]]:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        seconds, losses = [], []
        for batch in batches:
            started = time.perf_counter()
            loss = nll(network, batch)
            loss.backward()
            seconds.append(time.perf_counter() - started)
            losses.append(float(loss.detach()))
            model.zero_grad(set_to_none=True)
        return statistics.median(seconds), losses

    results = {}
    results["all layers"] = timed(model, list(model.parameters()))
    upper = full_trainable(model, args.from_layer)
    for name, share in (("upper, left-padded", False), ("upper, shared prefix", True)):
        stack = FrozenLowerStack(model, args.from_layer, pad, share_prefix=share)
        started = time.perf_counter()
        stack.precompute(examples)
        cached = time.perf_counter() - started
        results[name] = timed(stack, upper)
        print(f"{name}: lower layers 0-{args.from_layer - 1} cached for {len(examples)} rows in {cached:.1f} s")

    print(f"\n{args.dataset}, batch {args.batch} ({tokens:.0f} real tokens a step), {args.steps} steps, "
          f"layers {args.from_layer}-{model.config.num_hidden_layers - 1} trained in the 'upper' rows")
    print("| path | s/step (median) | tokens/s | speed-up vs all layers |")
    print("|---|---|---|---|")
    base = results["all layers"][0]
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.0f} | {base / seconds:.2f}x |")
    left, shared = results["upper, left-padded"][1], results["upper, shared prefix"][1]
    print(f"\nshared prefix vs left-padded: {results['upper, left-padded'][0] / results['upper, shared prefix'][0]:.2f}x; "
          f"largest loss difference {max(abs(a - b) for a, b in zip(left, shared)):.2e}")


if __name__ == "__main__":
    main()
