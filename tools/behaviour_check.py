"""Behaviour check: does a change leave every method's outcome bit-identical?

Every method (and the variants with their own code paths: query merging with member keys,
preserved questions, classic v*, entity keys, LoRA, self-written targets, finetune-then-unlearn,
the recovery attacks)
runs on a tiny random llama built in code, in one process on one torch thread. The script writes,
per run, every metric, a hash of every parameter and adapter tensor after the method, and the
method's report (timings left out). Run it on two checkouts and compare:

    git worktree add ../e2u-before <commit>
    (cd ../e2u-before && PYTHONPATH=$PWD python ../e2u/tools/behaviour_check.py /tmp/before.json)
    PYTHONPATH=$PWD python tools/behaviour_check.py /tmp/after.json
    python tools/behaviour_check.py --compare /tmp/before.json /tmp/after.json

A subset: ``tools/behaviour_check.py OUT.json none memit grace``. On the real model, compare two
results folders with ``e2u leaderboard`` and ``e2u regress --mode exact --tolerance 0``.
Needs ``E2U_DATA_DIR`` (the data mirror).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import traceback

EDIT = {"v_num_grad_steps": 4, "mom2_n_tokens": 2000}
TRAIN = {"epochs": 2}
RUNS = {
    "none": {"method": "none"},
    "rome": {"method": "rome", "layers": "[1]", **EDIT},
    "rome_subject_members_merge2": {"method": "rome", "layers": "[1]", "fact_token": "subject_last",
                                    "merge": "2", "merge_keys": "members", **EDIT},
    "memit": {"method": "memit", "layers": "[0,1]", **EDIT},
    "memit_merge2_members_preserve": {"method": "memit", "layers": "[0,1]", "merge": "2",
                                      "merge_keys": "members", "preserve_questions": "factual",
                                      "preserve_weight": "0.1", "fact_token": "subject_last", **EDIT},
    "memit_classic": {"method": "memit", "layers": "[0,1]", "v_mode": "classic", **EDIT},
    "alphaedit": {"method": "alphaedit", "layers": "[0,1]", **EDIT},
    "grace": {"method": "grace", "n_iter": 5},
    "wise": {"method": "wise", "n_iter": 5},
    "wise_key": {"method": "wise", "n_iter": 5, "fact_token": "subject_last", "edit_positions": "key",
                 "irrelevant_set": "factual"},
    "ga": {"method": "ga", **TRAIN},
    "gd": {"method": "gd", **TRAIN},
    "kl": {"method": "kl", **TRAIN},
    "dpo": {"method": "dpo", **TRAIN},
    "gd_lora": {"method": "gd", "lora": "true", **TRAIN},
    "alphaedit_self": {"method": "alphaedit", "layers": "[0,1]", "target": "self", **EDIT},
    "gd_finetune": {"method": "gd", "finetune": "pistol", "finetune_epochs": "1", "dataset": "pistol",
                    "forget_edge": "A_B", **TRAIN},
    "wise_quantize4": {"method": "wise", "n_iter": 5, "attack": "quantize", "attack_bits": "4",
                       "attack_group_size": "32"},
    "ga_relearn": {"method": "ga", **TRAIN, "attack": "relearn", "attack_steps": "2"},
}
VOLATILE = ("edit_cache", "cache", "key", "timings")  # and every "...seconds..." field


def compare(before_path: str, after_path: str) -> int:
    before, after = (json.load(open(path)) for path in (before_path, after_path))
    differ = 0
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            print("same", name)
            continue
        differ += 1
        print("DIFF", name)
        for part in ("error", "metrics", "weights", "report"):
            old, new = (before.get(name) or {}).get(part), (after.get(name) or {}).get(part)
            if old != new:
                print(f"    {part}: {json.dumps(old)[:300]}\n    vs {json.dumps(new)[:300]}")
    print(f"{differ} of {len(set(before) | set(after))} runs differ")
    return 1 if differ else 0


def tensor_hash(tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def without_volatile(value):
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if k not in VOLATILE and "second" not in k}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def run_one(model_dir: str, args: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir
    from e2u_models.model import E2ULM

    split = {} if "forget_edge" in args else {"forget_size": 3}
    task = "pistol" if args.get("dataset") == "pistol" else "tofu_factual"
    with tempfile.TemporaryDirectory() as cache:
        lm = E2ULM(pretrained=model_dir, device="cpu", batch_size=4, cache_dir=cache, **split, **args)
        manager = TaskManager(include_path=tasks_dir(), metadata=lm.task_metadata())
        results = simple_evaluate(model=lm, tasks=[task], limit=6, task_manager=manager)["results"]
    metrics = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in results.items()}
    weights = {n: tensor_hash(p) for n, p in lm.model.state_dict().items()}
    for number, adapter in enumerate(getattr(lm.model, "e2u_adapters", None) or []):
        weights.update({f"adapter{number}.{k}": tensor_hash(t) for k, t in adapter.tensors().items()})
    report = json.loads(json.dumps(without_volatile(lm.method_report.as_dict().get("details", {})), default=str))
    return {"metrics": metrics, "weights": weights, "report": report}


def main(out: str, names: list[str]) -> int:
    import torch

    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    found = {}
    with tempfile.TemporaryDirectory() as model_dir:
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer, layers=2).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        for name in names or list(RUNS):
            try:
                found[name] = run_one(model_dir, RUNS[name])
                print("done", name, flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded and compared like any outcome
                traceback.print_exc()
                found[name] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out, "w") as handle:
        json.dump(found, handle, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1], sys.argv[2:]))
