"""benchmarks/command_speed.py: what it reads from an lm-eval output folder and what it calls identical."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("command_speed", REPO / "benchmarks" / "command_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(folder: Path, generation: str, prob: float) -> None:
    """An lm-eval output folder as ``--output_path ... --log_samples`` writes it."""
    run = folder / "model_dir"
    run.mkdir(parents=True)
    stamp = "2026-12-03T06-35-07.908153"
    results = {"results": {"tofu_forget": {"prob,none": prob}}, "groups": {"tofu_factual": {"composite,none": 0.9}},
               "config": {"e2u": {"run_card": {"edit": {"seconds": 1.5}, "evaluation": {"seconds": 30.25}}}}}
    (run / f"results_{stamp}.json").write_text(json.dumps(results), encoding="utf-8")
    sample = {"doc_id": 0, "doc": {"question": "q"}, "arguments": {"gen_args_0": {"arg_0": "q"}},
              "resps": [[str({"generation": generation, "tokens": [1]})]],
              "filtered_resps": [str({"generation": generation, "tokens": [1]})]}
    (run / f"samples_tofu_forget_{stamp}.jsonl").write_text(json.dumps(sample) + "\n", encoding="utf-8")


def test_runs_compare_by_every_metric_and_every_answer(tmp_path):
    script = _script()
    for name, generation, prob in (("a", "Tolkien.", 0.25), ("b", "Tolkien.", 0.25),
                                   ("answer", "Lewis.", 0.25), ("metric", "Tolkien.", 0.2500001)):
        _write_run(tmp_path / name, generation, prob)
    outputs = {name: script.comparable(*script.read_outputs(tmp_path / name))
               for name in ("a", "b", "answer", "metric")}
    assert outputs["a"] == outputs["b"]
    assert outputs["a"][0] == outputs["answer"][0] and outputs["a"][1] != outputs["answer"][1]
    assert outputs["a"][0] != outputs["metric"][0] and outputs["a"][1] == outputs["metric"][1]
    assert list(outputs["a"][1]) == ["tofu_forget"]


def test_run_card_seconds_are_read_from_the_results(tmp_path):
    script = _script()
    _write_run(tmp_path / "run", "Tolkien.", 0.25)
    results, _ = script.read_outputs(tmp_path / "run")
    card = results["config"]["e2u"]["run_card"]
    assert script.run_card_seconds(results) == {"edit_s": card["edit"]["seconds"],
                                                "evaluation_s": card["evaluation"]["seconds"]}
