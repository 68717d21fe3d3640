"""benchmarks/command_speed.py: what it reads from an lm-eval output folder and what it calls identical."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("command_speed", REPO / "benchmarks" / "command_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(folder: Path, generation: str, prob: float, logprob: float = -1.25, rouge: float = 0.5) -> None:
    """An lm-eval output folder as ``--output_path ... --log_samples`` writes it."""
    run = folder / "model_dir"
    run.mkdir(parents=True)
    stamp = "2026-12-03T06-35-07.908153"
    results = {"results": {"tofu_forget": {"prob,none": prob, "rouge1_recall,none": rouge}},
               "groups": {"tofu_factual": {"composite,none": 0.9}},
               "config": {"e2u": {"run_card": {"edit": {"seconds": 1.5}, "evaluation": {"seconds": 30.25}}}}}
    (run / f"results_{stamp}.json").write_text(json.dumps(results), encoding="utf-8")
    answer = {"generation": generation, "tokens": [1], "logprobs": [logprob], "ranks": [3], "lens_rank": 3, "lens_layer": 2}
    sample = {"doc_id": 0, "doc": {"question": "q"}, "arguments": {"gen_args_0": {"arg_0": "q"}},
              "resps": [[str(answer)]], "filtered_resps": [str(answer)]}
    (run / f"samples_tofu_forget_{stamp}.jsonl").write_text(json.dumps(sample) + "\n", encoding="utf-8")


def test_runs_compare_answers_exactly_and_teacher_forced_numbers_by_their_difference(tmp_path):
    script = _script()
    runs = {"a": ("Tolkien.", 0.25), "b": ("Tolkien.", 0.25), "answer": ("Lewis.", 0.25),
            "metric": ("Tolkien.", 0.2500001)}
    for name, (generation, prob) in runs.items():
        _write_run(tmp_path / name, generation, prob, logprob=-1.25 if name != "metric" else -1.2500004)
    _write_run(tmp_path / "rouge", "Tolkien.", 0.25, rouge=0.6)
    outputs = {name: script.comparable(*script.read_outputs(tmp_path / name)) for name in [*runs, "rouge"]}
    assert outputs["a"] == outputs["b"]
    assert list(outputs["a"][1]) == ["tofu_forget"] and outputs["a"][1]["tofu_forget"][0][3] == ["Tolkien."]

    same = script.identity_report(outputs["a"], [outputs["b"]])
    assert same["identical_answers"] and same["identical_metrics"] and same["identical_text_metrics"]
    assert (same["max_logprob_diff"], same["samples_other_ranks"], same["samples_other_lens_ranks"]) == (0.0, 0, 0)

    noise = script.identity_report(outputs["a"], [outputs["b"], outputs["metric"]])
    assert noise["identical_answers"] and noise["identical_text_metrics"] and not noise["identical_metrics"]
    assert noise["max_teacher_forced_metric_diff"]["prob,none"] == pytest.approx(1e-7)
    assert noise["max_logprob_diff"] == pytest.approx(4e-7)

    assert not script.identity_report(outputs["a"], [outputs["answer"]])["identical_answers"]
    text = script.identity_report(outputs["a"], [outputs["rouge"]])
    assert text["identical_answers"] and not text["identical_text_metrics"]
    assert script.is_teacher_forced("lens_hit@10_stderr,none") and not script.is_teacher_forced("composite,none")


def test_run_card_seconds_are_read_from_the_results(tmp_path):
    script = _script()
    _write_run(tmp_path / "run", "Tolkien.", 0.25)
    results, _ = script.read_outputs(tmp_path / "run")
    card = results["config"]["e2u"]["run_card"]
    assert script.run_card_seconds(results) == {"edit_s": card["edit"]["seconds"],
                                                "evaluation_s": card["evaluation"]["seconds"]}


def test_main_reports_the_noise_run_at_another_batch_size(tmp_path, monkeypatch, capsys):
    """The whole script with lm-eval stood in by folders it would write: the noise run is the old
    tree at ``--batch_size 16``, compared with the first old run like the new runs are."""
    script = _script()
    calls = []

    def fake_git(*args, cwd=None):
        return {"rev-parse": "a" * 40 if "HEAD" not in args else "b" * 40}.get(args[0], "")

    def fake_run(tree, argv, log):
        calls.append(argv)
        shift = 3e-6 if "--batch_size" in argv else 1e-6 if tree == script.ROOT else 0.0
        _write_run(Path(argv[argv.index("--output_path") + 1]), "Tolkien.", 0.25, logprob=-1.25 + shift)
        return {"wall_s": 10.0, "peak_rss_mib": 100.0}

    monkeypatch.setattr(script, "git", fake_git)
    monkeypatch.setattr(script, "run_once", fake_run)
    monkeypatch.setattr(script, "lm_eval_program", lambda: "lm_eval")
    out = tmp_path / "figures.json"
    monkeypatch.setattr("sys.argv", ["command_speed.py", "--old-rev", "a" * 12, "--repeats", "1",
                                     "--noise-batch-size", "16", "--json", str(out)])
    script.main()
    summary = json.loads(out.read_text(encoding="utf-8"))["summary"][0]
    assert [argv[-2:] for argv in calls if "--batch_size" in argv] == [["--batch_size", "16"]]
    assert len(calls) == 3 and summary["identical_answers"]
    assert summary["max_logprob_diff"] == pytest.approx(1e-6)
    assert summary["noise_batch_size_16_max_logprob_diff"] == pytest.approx(3e-6)
    assert summary["noise_batch_size_16_identical_answers"]
    assert json.loads(capsys.readouterr().out)["summary"][0] == summary
