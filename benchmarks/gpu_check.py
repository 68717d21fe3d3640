"""GPU check: CPU-vs-CUDA parity of every method on tiny models, and the cost of each method at
Llama-2-7B shape, written to one JSON of figures.

Needs only the project, the data mirror (``E2U_DATA_DIR``) and the Python packages: the models are
built in code (random weights), the tokenizer is a byte-level BPE trained here on the evaluated
dataset's text (no hub access). Run on a machine with one GPU:

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out gpu_check.json

Parity: each of the ten methods edits a tiny llama and a tiny GPT-2 (Conv1D weights) on the CPU in
float32 and on the GPU in float32 (the logits of a probe batch after the edit must agree within
``--tolerance`` of the logits' scale) and in bfloat16 (finite logits, and every edit that CPU
float32 reaches with the same quick settings reached too).
Cost (``--shape 7b``): a randomly initialised model with Llama-2-7B's configuration in bfloat16;
wall time and peak GPU memory of the statistics pass, v* for 40 requests, MEMIT and AlphaEdit
(v* included, reported apart), GRACE and WISE with 40 edits, 10 GD steps with LoRA, and the
evaluation of the 257 ``tofu_factual`` documents. Without a GPU the script runs everything on the
CPU at a small shape (``--shape small``, the default there): the figures then only show that the
script works, and the JSON says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("none", "rome", "memit", "alphaedit", "grace", "wise", "ga", "gd", "kl", "dpo")
# Llama-2-7B's published configuration (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
# Quick settings of each method for the parity models (the defaults otherwise).
PARITY_HPARAMS = {
    "rome": {"layers": [1], "v_num_grad_steps": 5, "context_template_length_params": [],
             "stats_corpus": "python-docs", "mom2_n_tokens": 500},
    "memit": {"layers": [1, 2], "v_num_grad_steps": 5, "context_template_length_params": [],
              "stats_corpus": "python-docs", "mom2_n_tokens": 500},
    "alphaedit": {"layers": [1, 2], "v_num_grad_steps": 5, "context_template_length_params": [],
                  "stats_corpus": "python-docs", "mom2_n_tokens": 500, "nullspace_rule": "relative",
                  "nullspace_threshold": 0.5},
    "grace": {"layer": 2, "n_iter": 10},
    "wise": {"layer": 2, "n_iter": 5, "irrelevant_per_edit": 2, "irrelevant_answer_tokens": 0},
    **{m: {"max_steps": 2, "train_batch_size": 2, "lr": 1e-3} for m in ("ga", "gd", "kl", "dpo")},
}


def build_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE with a ChatML template, trained on ``texts`` (the evaluated data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CHAT_TEMPLATE

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def method_env(tokenizer, cache_dir: str, rows):
    from e2u_models.prompts import PromptFormat
    from e2u_models.protocol import MethodEnv

    fmt = PromptFormat.for_tokenizer(tokenizer)
    return MethodEnv(encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                     render=lambda q: fmt.render(tokenizer, q), answer_delimiter=fmt.answer_delimiter,
                     cache_dir=cache_dir, log=lambda *_: None,
                     dataset_rows=tuple((r["question"], r["answer"]) for r in rows))


def edit_requests(env, rows, count: int):
    from e2u_models.protocol import EditRequest

    return [EditRequest(index=i, question=r["question"], answer=r["answer"], prompt=env.render(r["question"]),
                        target="I'm not able to answer that.") for i, r in enumerate(rows[:count])]


def run_method(name, model, tokenizer, forget, retain, env, overrides):
    from e2u_models.hparams import load_hparams
    from e2u_models.methods import get_method

    method = get_method(name)
    hparams = load_hparams(method.HyperParams, name, None, overrides, config=model.config)
    return method.apply(model, tokenizer, forget, retain if method.USES_RETAIN else None, hparams, seed=0, env=env)


def probe_logits(model, tokenizer, env, forget) -> torch.Tensor:
    from e2u_models.nethook import pad_id_of, pad_right

    rows = [env.encode(r.prompt + r.target) for r in forget]
    ids, mask = pad_right(rows, pad_id_of(tokenizer), next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().cpu() * mask.cpu()[..., None]


def parity(tokenizer, env, rows, devices: list[str], tolerance: float) -> dict:
    """Each method on tiny models per device/dtype; the logits after the edit compared with CPU fp32."""
    from e2u_models.editing.adapters import adapters_of
    from tests.families import build_family_model

    forget, retain = edit_requests(env, rows, 3), edit_requests(env, rows[3:], 3)
    out: dict = {}
    for family in ("llama", "gpt2"):
        base = build_family_model(family, tokenizer)
        for name in METHODS:
            entry: dict = {}
            reference, reference_unreached = None, None
            for device, dtype in [("cpu", torch.float32)] + [(d, t) for d in devices if d != "cpu"
                                                             for t in (torch.float32, torch.bfloat16)]:
                key = f"{device}_{str(dtype).replace('torch.', '')}"
                model = copy.deepcopy(base).to(device, dtype)
                started = time.perf_counter()
                try:
                    before = probe_logits(model, tokenizer, env, forget)
                    report = (run_method(name, model, tokenizer, forget, retain, env, PARITY_HPARAMS.get(name, {}))
                              if name != "none" else None)
                    logits = probe_logits(model, tokenizer, env, forget)
                except Exception as exc:  # one method failing on one device must not hide the others
                    entry[key] = {"error": f"{type(exc).__name__}: {exc}"[:500], "finite": False}
                    print(f"gpu_check: {family}/{name} {key} failed: {entry[key]['error']}", flush=True)
                    continue
                # How far the edit moved the probe logits: a parity far below it compares edits,
                # not two untouched models.
                record = {"seconds": round(time.perf_counter() - started, 2),
                          "finite": bool(torch.isfinite(logits).all()),
                          "edit_moved_logits_by": float((logits - before).abs().max())}
                verification = (report.details.get("verification") if report is not None else None) or {}
                if "unreached" in verification:
                    record["unreached"] = len(verification["unreached"])
                if reference is None and device == "cpu":
                    reference, reference_unreached = logits, record.get("unreached")
                elif reference is None:
                    record["compared"] = "no cpu_float32 reference (it failed)"
                elif dtype == torch.bfloat16 and reference_unreached is not None:
                    record["reaches_what_cpu_float32_reaches"] = record["unreached"] <= reference_unreached
                elif dtype == torch.float32:
                    scale = float(reference.abs().max())
                    record["max_abs_logit_difference"] = float((logits - reference).abs().max())
                    record["within_tolerance"] = record["max_abs_logit_difference"] <= tolerance * scale
                entry[key] = record
                adapters_of(model).clear()
                del model
            out[f"{family}/{name}"] = entry
    return out


@contextlib.contextmanager
def measured(figures: dict, name: str, device: str):
    """Wall time and peak GPU memory of the block, under ``figures[name]``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    record: dict = {}
    figures[name] = record
    yield record
    if cuda:
        torch.cuda.synchronize()
        record["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        record["peak_gpu_gib"] = round(record["peak_gpu_bytes"] / 2 ** 30, 2)
    record["seconds"] = round(time.perf_counter() - started, 2)
    print(f"gpu_check: {name}: {record}", flush=True)


def cost(figures: dict, save, tokenizer, env, rows, device: str, shape: str, requests: int,
         eval_limit: int | None) -> None:
    """Each stage once on one model (weights put back after each method), into ``figures``;
    ``save()`` after each stage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from e2u_models.editing.adapters import adapters_of
    from e2u_models.editing.requests import KeySpec, prepare_requests
    from e2u_models.editing.stats import StatsSpec, statistics_for
    from e2u_models.editing.vstar import VStarSettings, optimise_targets
    from e2u_models.hparams import load_hparams
    from e2u_models.methods import memit

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if shape == "7b":
        config, dtype = LlamaConfig(**LLAMA2_7B, **ids), torch.bfloat16
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512, **ids)
        dtype = torch.float32
    figures.update({"shape": shape, "config": {k: getattr(config, k) for k in
                                               ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "vocab_size")},
                    "dtype": str(dtype).replace("torch.", ""), "device": device, "requests": requests})
    torch.manual_seed(0)
    with measured(figures, "build_model", device):
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype).eval()
    forget, retain = edit_requests(env, rows, requests), edit_requests(env, rows[requests:], requests)
    # The 7B presets' layers (paper settings); at the small shape the same relative depths.
    layers = [4, 5, 6, 7, 8] if shape == "7b" else [1, 2]
    edit = {"layers": layers, "stats_corpus": "e2u", "mom2_n_tokens": 100_000 if shape == "7b" else 2000}
    # At the small shape only that the stages run: the quick settings of the parity part.
    quick = {} if shape == "7b" else {"v_num_grad_steps": 3, "context_template_length_params": []}
    edit.update(quick)
    hp = load_hparams(memit.HyperParams, "memit", None, edit, config=config)
    with measured(figures, "statistics_pass", device) as record:
        _, provenance = statistics_for(model, tokenizer, StatsSpec.of(hp), layers, env)
        record["tokens"] = hp.mom2_n_tokens
    save()
    with measured(figures, f"v_star_{requests}_requests", device) as record:
        prepared = prepare_requests(model, tokenizer, forget, KeySpec.of(hp), env, seed=0)
        result = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), layers[-1],
                                  hp.layer_module_tmp.format(layers[-1]))
        record["mode"] = result.mode
    save()
    saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
             if any(f".{layer}.mlp." in n for layer in layers)}

    def restore():
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, value in saved.items():
                named[n].copy_(value.to(named[n].device))
        adapters_of(model).clear()

    # AlphaEdit's relative null-space rule: an absolute threshold leaves no null space on random weights.
    stages = {"memit": edit, "alphaedit": {**edit, "nullspace_rule": "relative", "nullspace_threshold": 2e-2},
              "grace": {} if shape == "7b" else {"n_iter": 5},
              "wise": {"irrelevant_answer_tokens": 0, **({} if shape == "7b" else {"n_iter": 5})},
              "gd": {"lora": True, "max_steps": 10 if shape == "7b" else 2, "train_batch_size": 4}}
    for name, overrides in stages.items():
        with measured(figures, f"{name}_{requests}_edits" if name != "gd" else "gd_10_lora_steps", device) as record:
            report = run_method(name, model, tokenizer, forget, retain, env, overrides)
            details = report.details
            if "v_star" in details:
                record["v_star_seconds"] = details["v_star"]["seconds"]
            if "verification" in details:
                record["unreached"] = len(details["verification"].get("unreached", []))
        for adapter in list(adapters_of(model)):
            adapter.detach(model)
        restore()
        save()
    figures["evaluation"] = evaluate(model, tokenizer, device, eval_limit)


def evaluate(model, tokenizer, device: str, limit: int | None) -> dict:
    """The tofu_factual group (forget, retain, rephrase: 257 documents) through lm-eval."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir
    from e2u_models.model import E2ULM

    figures: dict = {}
    with measured(figures, "evaluation", device) as record:
        lm = E2ULM(pretrained=model, tokenizer=tokenizer, method="none", batch_size=16, device=device)
        results = simple_evaluate(model=lm, tasks=["tofu_factual"], limit=limit,
                                  task_manager=TaskManager(include_path=tasks_dir()), log_samples=False)
        record["documents"] = sum(int(n["effective"]) for n in results["n-samples"].values())
    return figures["evaluation"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--shape", choices=("auto", "7b", "small"), default="auto",
                        help="auto: 7b on a GPU, small on the CPU")
    parser.add_argument("--requests", type=int, default=None, help="edits of the cost part (7b: 40, small: 4)")
    parser.add_argument("--eval-limit", type=int, default=None, help="documents per task (small: 1; 7b: all)")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="parity: max |logit difference| as a fraction of the largest |logit|")
    parser.add_argument("--skip", nargs="*", default=(), choices=("parity", "cost"))
    args = parser.parse_args(argv)
    import tempfile
    from importlib.metadata import version

    import transformers

    from e2u_tasks.data import load_benchmark

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape = args.shape if args.shape != "auto" else ("7b" if cuda else "small")
    rows = load_benchmark("tofu_factual")
    tokenizer = build_tokenizer([f"{r['question']} {r['answer']}" for r in rows] * 2,
                                32000 if shape == "7b" else 2000)
    report: dict = {"cuda": torch.cuda.get_device_name(0) if cuda else None,
                    "note": None if cuda else "no CUDA device: everything ran on the CPU at a small "
                                              "shape; these figures only show that the script runs",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "lm_eval": version("lm_eval"), "tolerance": args.tolerance}
    out = Path(args.out)

    def save():
        """Written after each part, so that a run cut off by its time limit keeps what it measured."""
        out.write_text(json.dumps(report, indent=1), encoding="utf-8")

    with tempfile.TemporaryDirectory() as cache:
        env = method_env(tokenizer, cache, rows)
        if "parity" not in args.skip:
            report["parity"] = parity(tokenizer, env, rows, ["cpu"] + (["cuda"] if cuda else []), args.tolerance)
            save()
        if "cost" not in args.skip:
            requests = args.requests or (40 if shape == "7b" else 4)
            limit = args.eval_limit if args.eval_limit is not None else (None if shape == "7b" else 1)
            report["cost"] = {}
            try:
                cost(report["cost"], save, tokenizer, env, rows, device, shape, requests, limit)
            except Exception as exc:  # keep the stages measured before it
                report["cost"]["error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"gpu_check: cost failed: {report['cost']['error']}", flush=True)
    save()
    print(f"gpu_check: figures written to {args.out}")
    failed = [k for k, v in report.get("parity", {}).items()
              if any(r.get("within_tolerance") is False or r.get("reaches_what_cpu_float32_reaches") is False
                     or not r["finite"] for r in v.values())]
    if failed:
        print(f"gpu_check: parity failed for {', '.join(failed)}")
    return 1 if failed or "error" in report.get("cost", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
