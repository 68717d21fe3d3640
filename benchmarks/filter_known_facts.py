"""Rebuild the ``known_facts`` benchmark: keep the candidate rows the embedded model knows.

Every row of ``e2u_tasks/data/known_facts/candidates.jsonl`` is asked, in both phrasings, of the
unedited embedded SmolLM2-135M-Instruct through the ``e2u`` model's own greedy answering (the
tasks' prompt, stop strings and length); a row is kept when both answers pass
:data:`e2u_tasks.known.KNOWN_RULE`. Writes ``known_facts.jsonl`` (the kept rows, in candidate
order) and ``filter.json`` (rule, model, settings, counts, every dropped row with its answers)
next to the candidates, and prints the counts.

    python benchmarks/filter_known_facts.py           # rewrite the shipped files
    python benchmarks/filter_known_facts.py --check   # compare with them; exit 1 on a difference
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

FIELDS = ("question", "paraphrase", "answer", "subject", "category")


def data_folder() -> Path:
    return Path(str(resources.files("e2u_tasks").joinpath("data", "known_facts")))


def run_filter(model: str, batch_size: int, device: str) -> tuple[list[dict], dict]:
    """The kept rows and the provenance record."""
    from e2u_models.cache import file_sha256
    from e2u_models.edit_cache import model_sha256
    from e2u_models.model import E2ULM, task_generation_kwargs
    from e2u_models.protocol import EditRequest
    from e2u_tasks.data import read_qa_file
    from e2u_tasks.known import KNOWN_RULE, judge_rows

    candidates_path = data_folder() / "candidates.jsonl"
    rows = read_qa_file(candidates_path)
    # method=none on the candidates as a user dataset: the model is loaded and left unedited.
    lm = E2ULM(pretrained=model, method="none", dataset=str(candidates_path), forget_size=1,
               batch_size=batch_size, device=device)

    def answer(asked: list[tuple[int, str, str]]) -> list[str]:
        return lm.greedy_answers([EditRequest(index=i, question=q, prompt="", answer=a)
                                  for i, q, a in asked])

    verdicts = judge_rows(rows, answer)
    kept = [v["index"] for v in verdicts if v["known"]]
    record = {
        "rule": KNOWN_RULE,
        "model": {**lm.model_source, "model_sha256": model_sha256(lm.model)},
        "prompt": lm.prompt_format.describe(),
        "generation": task_generation_kwargs(),
        "candidates_sha256": file_sha256(candidates_path),
        "counts": {"candidates": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept)},
        "kept_indices": kept,
        "dropped": [{"index": v["index"], "question": rows[v["index"]]["question"],
                     "answer": rows[v["index"]]["answer"], "failed": v["failed"],
                     "answers": v["answers"]} for v in verdicts if not v["known"]],
    }
    return [{k: rows[i][k] for k in FIELDS if k in rows[i]} for i in kept], record


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", action="store_true",
                        help="compare with the shipped files instead of writing them")
    args = parser.parse_args()
    kept, record = run_filter(args.model, args.batch_size, args.device)
    counts = record["counts"]
    print(f"known_facts: {counts['candidates']} candidates, {counts['kept']} kept, "
          f"{counts['dropped']} dropped ({record['rule']})")
    folder = data_folder()
    if args.check:
        shipped = json.loads((folder / "filter.json").read_text(encoding="utf-8"))
        same = (shipped["kept_indices"] == record["kept_indices"]
                and (folder / "known_facts.jsonl").read_text(encoding="utf-8") == jsonl(kept))
        print("matches the shipped files" if same else "DIFFERS from the shipped files")
        return 0 if same else 1
    (folder / "known_facts.jsonl").write_text(jsonl(kept), encoding="utf-8")
    (folder / "filter.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    print(f"wrote {folder / 'known_facts.jsonl'} and {folder / 'filter.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
