"""How far does float noise move WISE's outcome? (issue #20, part 3: WISE across machines)

Another CPU or a GPU changes the model's floating-point sums in the last bits. This benchmark
imitates that on one machine: every weight is multiplied by (1 + eps·N(0, 1)) with eps at float
noise (1e-7 relative, about fp32's resolution), WISE is trained again on the same requests, and
the outcome is compared with the unperturbed run: the relative change of the side memory D, the
routing threshold, and the share of probe tokens (edit and other prompts) routed differently.
A stable method moves by about eps; a chaotic training amplifies it to whole decisions.

Figures per ``edit_lr`` (the step of WISE's optimiser: SGD as published, EasyEdit's 1.0; Adam with
``--set optimizer=adam``), side by side in one run, on a tiny random llama by default (seconds);
with ``--model``, the model's preset on a dev split unless ``--lrs``/``--set`` say otherwise:

    python benchmarks/wise_sensitivity.py
    python benchmarks/wise_sensitivity.py --lrs 1.0 0.1 0.01 --eps 1e-7 1e-6 --json out.json
    python benchmarks/wise_sensitivity.py --model smollm2-135m-instruct --noise-seeds 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [f"Who wrote the book number {i} about {topic}?" for i, topic in enumerate(
    ["rivers", "stars", "cats", "glass", "salt", "maps", "wind", "coins", "bells", "ice", "paper", "trains"])]
PROBES = QUESTIONS + [f"What colour is the {thing}?" for thing in ("sky", "grass", "sea", "sun", "snow", "coal")]


def build(eps: float, noise_seed: int):
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    if eps:
        perturb(model, eps, noise_seed)
    return model, tokenizer


def train(eps: float, noise_seed: int, edit_lr: float, n_iter: int, extra: dict | None = None):
    """WISE on the (perturbed) tiny model: its side memory, threshold and probe routing."""
    import torch

    from e2u_models.editing.adapters import adapters_of
    from e2u_models.hparams import load_hparams
    from e2u_models.methods import wise
    from e2u_models.prompts import PromptFormat
    from e2u_models.protocol import EditRequest, MethodEnv

    model, tokenizer = build(eps, noise_seed)
    prompt_format = PromptFormat.for_tokenizer(tokenizer)
    env = MethodEnv(encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                    render=lambda q: prompt_format.render(tokenizer, q),
                    answer_delimiter=prompt_format.answer_delimiter, log=lambda *_: None)
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I don't know")
                for i, q in enumerate(QUESTIONS)]
    hparams = load_hparams(wise.HyperParams, "wise", None, {
        "layer": 1, "n_iter": n_iter, "edit_lr": edit_lr, "act_margin": [1.0, 4.0, 2.0], "target_eos": False,
        **(extra or {})})
    wise.apply(model, tokenizer, requests, None, hparams, seed=0, env=env)
    (memory,) = adapters_of(model)
    routed = [wise.routed_tokens(model, memory, torch.tensor([env.encode(env.render(q))])) >= 0 for q in PROBES]
    return memory.deltas[0].clone(), memory.thresholds[0], torch.cat(routed)


def perturb(model, eps: float, noise_seed: int) -> None:
    """Every weight times (1 + eps·N(0, 1)): another machine's float rounding, imitated."""
    import torch

    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + eps * torch.randn(parameter.shape, generator=generator))


def train_embedded(model_name: str, forget_seed: int, eps: float, noise_seed: int, overrides: dict):
    """WISE with the model's own preset on a TOFU-factual forget split (40 rows), the (perturbed)
    embedded model: side memory, threshold, the routing of every token of the forget and retain
    prompts, and the first greedy tokens of every one of those prompts (the outcome)."""
    import torch

    from e2u_models.editing.adapters import adapters_of
    from e2u_models.hparams import load_hparams, resolve_hparams_path
    from e2u_models.methods import wise
    from e2u_models.model import E2ULM
    from e2u_tasks.metrics import rouge1_recall, rouge1_scorer

    lm = E2ULM(pretrained=model_name, method="none", forget_seed=forget_seed, device="cpu", cache="false",
               batch_size=64)
    model, tokenizer = lm.model, lm.tokenizer
    if eps:
        perturb(model, eps, noise_seed)
    preset = resolve_hparams_path("wise", None, model.config)
    hparams = load_hparams(wise.HyperParams, "wise", preset, overrides, config=model.config)
    forget = lm.requests_for(lm.splits.forget, with_targets=True)
    wise.apply(model, tokenizer, forget, None, hparams, seed=0, env=lm._method_env())
    (memory,) = adapters_of(model)
    probes = lm.requests_for(list(lm.splits.forget) + list(lm.splits.retain)[:40])
    encoded = [lm._runtime.encode(r.prompt) for r in probes]
    routed = torch.cat([wise.routed_tokens(model, memory, torch.tensor([ids])) >= 0 for ids in encoded])
    answers = lm.greedy_answers(probes)
    scorer = rouge1_scorer()
    recall = [rouge1_recall(r.answer, a, scorer) for r, a in zip(probes, answers)]
    rouge = {"forget_rouge1": sum(recall[:len(forget)]) / len(forget),
             "retain_rouge1": sum(recall[len(forget):]) / (len(recall) - len(forget))}
    trained = {"optimizer": hparams.optimizer, "edit_lr": hparams.edit_lr, "n_iter": hparams.n_iter,
               "margin_mean": hparams.margin_mean}
    return memory.deltas[0].clone(), memory.thresholds[0], routed, answers, rouge, trained


def embedded_rows(args) -> list[dict]:
    rows = []
    print("| optimizer | edit_lr | n_iter | eps | noise seed | ‖ΔD‖/‖D‖ | threshold (unperturbed) | threshold "
          "| probe tokens routed differently | probe answers that differ | forget / retain ROUGE-1 "
          "(unperturbed) | forget / retain ROUGE-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lr in args.lrs:
        overrides = {**({"edit_lr": lr} if lr is not None else {}),
                     **({"n_iter": args.n_iter} if args.n_iter else {}), **args.set}
        delta0, threshold0, routed0, answers0, rouge0, trained = train_embedded(
            args.model, args.forget_seed, 0.0, 0, overrides)
        for eps in args.eps:
            for seed in range(1, args.noise_seeds + 1):
                delta, threshold, routed, answers, rouge, _ = train_embedded(
                    args.model, args.forget_seed, eps, seed, overrides)
                row = {"model": args.model, "forget_seed": args.forget_seed, **args.set, **trained,
                       "eps": eps, "noise_seed": seed,
                       "delta_change": float((delta - delta0).norm() / delta0.norm()),
                       "threshold_unperturbed": threshold0, "threshold": threshold,
                       "routing_flips": float((routed != routed0).float().mean()),
                       "answers_differing": sum(a != b for a, b in zip(answers, answers0)),
                       "answers": len(answers0),
                       **{f"{k}_unperturbed": round(v, 4) for k, v in rouge0.items()},
                       **{k: round(v, 4) for k, v in rouge.items()}}
                rows.append(row)
                if args.json:  # after every row: a long run stopped early keeps what it measured
                    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
                print(f"| {row['optimizer']} | {row['edit_lr']:g} | {row['n_iter']} | {eps:g} | {seed} | {row['delta_change']:.2e} | "
                      f"{threshold0:.4f} | {threshold:.4f} | {row['routing_flips']:.1%} | "
                      f"{row['answers_differing']} / {row['answers']} | "
                      f"{rouge0['forget_rouge1']:.3f} / {rouge0['retain_rouge1']:.3f} | "
                      f"{rouge['forget_rouge1']:.3f} / {rouge['retain_rouge1']:.3f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="edit_lr values (default: 1.0 0.1 0.01 on the tiny model, the preset's with --model)")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-7])
    parser.add_argument("--noise-seeds", type=int, default=2)
    parser.add_argument("--n-iter", type=int, default=60)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--model", help="an embedded or local model (e.g. smollm2-135m-instruct): WISE "
                        "with its preset on a TOFU-factual forget split instead of the tiny model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed within a run)")
    parser.add_argument("--set", nargs="*", default=[], metavar="HPARAM=VALUE",
                        help="other WISE hparams for every run, e.g. margin_mean=all")
    parser.add_argument("--forget-seed", type=int, default=100, help="dev split by default (seeds 100+)")
    args = parser.parse_args()
    import torch
    import yaml

    args.set = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)
    if args.model:
        import os

        os.environ.setdefault("E2U_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        args.n_iter = args.n_iter if "--n-iter" in sys.argv else None  # the preset's by default
        args.lrs = args.lrs or [None]
        embedded_rows(args)
        return
    args.lrs = args.lrs or [1.0, 0.1, 0.01]
    rows = []
    if args.set:
        print(f"WISE hparams: {args.set}")
    print("| edit_lr | eps | noise seed | ‖ΔD‖/‖D‖ | threshold (unperturbed) | threshold | probe tokens routed differently |")
    print("|---|---|---|---|---|---|---|")
    for lr in args.lrs:
        delta0, threshold0, routed0 = train(0.0, 0, lr, args.n_iter, args.set)
        for eps in args.eps:
            for seed in range(1, args.noise_seeds + 1):
                delta, threshold, routed = train(eps, seed, lr, args.n_iter, args.set)
                row = {"edit_lr": lr, **args.set, "eps": eps, "noise_seed": seed,
                       "delta_change": float((delta - delta0).norm() / delta0.norm()),
                       "threshold_unperturbed": threshold0, "threshold": threshold,
                       "routing_flips": float((routed != routed0).float().mean())}
                rows.append(row)
                print(f"| {lr:g} | {eps:g} | {seed} | {row['delta_change']:.2e} | {threshold0:.4f} | "
                      f"{threshold:.4f} | {row['routing_flips']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
