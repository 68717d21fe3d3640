"""``e2u sweep`` / ``report`` / ``leaderboard`` / ``regress`` on synthetic lm-eval results files
(same layout as lm-eval 0.4.13 writes with ``--model e2u --log_samples``): milliseconds each."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from e2u_experiments import figures
from e2u_experiments.cli import main
from e2u_experiments.runs import read_run
from e2u_experiments.sweep import SweepConfig, run_sweep

STAMP = "2026-11-28T10-00-00.000000"


def write_result(folder: Path, method: str = "none", options: dict | None = None, seed: int = 0,
                 forget: list[float] | None = None, retain: list[float] | None = None,
                 rephrase: list[float] | None = None, samples: bool = True, forget_size: int | None = None,
                 limit=None, stamp: str = STAMP, refusal: bool = False, lens: bool = False,
                 evaluated: list[int] | None = None, forget_seed: int = 0) -> Path:
    """One run's results_*.json (+ samples_*.jsonl) with per-document ROUGE-1 values given;
    prob/mrr/hit (and with ``lens`` the logit-lens metrics) are derived from them so every metric
    differs between documents. ``evaluated``: positions of the forget rows the forget and
    rephrase tasks evaluated (attack=relearn on the other half)."""
    forget = forget if forget is not None else [1.0, 0.5, 0.0, 1.0]
    retain = retain if retain is not None else [1.0, 1.0, 0.5, 0.0, 0.5]
    rephrase = rephrase if rephrase is not None else [x * 0.5 for x in forget]
    forget_rows = list(range(0, 2 * len(forget), 2))
    retain_rows = [i for i in range(2 * len(forget) + len(retain)) if i not in forget_rows][:len(retain)]
    docs = {"forget": list(zip(forget_rows, forget)), "retain": list(zip(retain_rows, retain)),
            "rephrase": list(zip(forget_rows, rephrase))}
    if evaluated is not None:
        for split in ("forget", "rephrase"):
            docs[split] = [docs[split][p] for p in evaluated]
    out = folder / "smollm2-135m-instruct"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for split, rows in docs.items():
        task = f"tofu_{split}"
        per_doc = [_doc_metrics(split, r1, refusal, lens) for _, r1 in rows]
        row = {"name": task, "alias": task, "sample_len": len(rows)}
        for metric in per_doc[0]:
            values = [d[metric] for d in per_doc]
            row[f"{metric},none"] = sum(values) / len(values)
            row[f"{metric}_stderr,none"] = 0.01
        results[task] = row
        if samples:
            with open(out / f"samples_{task}_{stamp}.jsonl", "w") as handle:
                for doc_id, ((index, r1), metrics) in enumerate(zip(rows, per_doc)):
                    response = {"generation": f"answer {method} {index}", "tokens": [1], "logprobs": [-1.0], "ranks": [1]}
                    handle.write(json.dumps({
                        "doc_id": doc_id, "doc": {"index": index, "question": f"Question {index}?",
                                                  "answer": f"gold {index}", "split": split},
                        "target": f"gold {index}", "resps": [[str(response)]], "filtered_resps": [str(response)],
                        "filter": "none", **metrics}) + "\n")
    composite = 1 - results["tofu_forget"]["rouge1_recall,none"] + results["tofu_retain"]["rouge1_recall,none"]
    group = {"alias": "tofu_factual", "name": "tofu_factual", "composite,none": composite,
             "composite_stderr,none": 0.05}
    results["tofu_factual"] = group
    model_args = {"pretrained": "smollm2-135m-instruct", "method": method, "seed": seed, **(options or {})}
    if forget_size is not None:
        model_args["forget_size"] = forget_size
    data = {
        "results": results, "groups": {"tofu_factual": group},
        "config": {"model": "e2u", "model_args": model_args, "limit": limit, "random_seed": 0,
                   "e2u": {"method": method, "seed": seed, "hparams": {"merge": 1, **(options or {})},
                           "hparams_sha256": "ab" * 32,
                           "split": {"dataset": "tofu_factual", "forget_rows": forget_size or len(forget),
                                     "forget_seed": forget_seed, "data_sha256": "cd" * 32,
                                     "forget_row_indices": forget_rows,
                                     **({"evaluated_forget_row_indices": [r for r, _ in docs["forget"]]}
                                        if evaluated is not None else {})},
                           "model_source": {"pretrained": "smollm2-135m-instruct", "gguf_sha256": "ef" * 32},
                           "method_report": {"seconds": 12.5, "details": {"verification": {"unreached": [0]}}},
                           "packages": {"e2u": "0.1.0", "torch": "2.13.0+cpu"},
                           "fingerprint": {"device_type": "cpu", "device_name": "Some CPU @ 2.0GHz",
                                           "dtype": "float32", "torch": "2.13.0+cpu", "threads": 2,
                                           "deterministic_algorithms": False},
                           "run_card": {"edit": {"seconds": 12.5, "peak_rss_bytes": 2 * 2**30},
                                        "evaluation": {"seconds": 80.0, "peak_rss_bytes": 3 * 2**30},
                                        "targets": {"reached": 39, "requests": 40}}}},
    }
    path = out / f"results_{stamp}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _doc_metrics(split: str, r1: float, refusal: bool = False, lens: bool = False) -> dict[str, float]:
    metrics = {"rouge1_recall": r1, "prob": 0.1 * r1 + 0.01, "mrr": 0.5 * r1 + 0.1, "hit_rate": 0.2 + 0.8 * r1}
    if lens:  # the answer readable at some layer whenever the model gives part of it
        metrics.update({"lens_mrr": 0.25 + 0.75 * r1, "lens_hit@10": float(r1 > 0.0)})
    if refusal:  # as e2u_tasks.refusal scores them: a refusal has no answer word in it
        metrics.update({"refusal_rate": float(r1 == 0.0), "entity_mention": float(r1 < 1.0),
                        "answer_leak": float(r1 == 1.0)})
    if split != "rephrase":
        metrics["composite"] = 2 * (1 - r1) if split == "forget" else 2 * r1
    return metrics


@pytest.fixture
def results_dir(tmp_path) -> Path:
    root = tmp_path / "results"
    write_result(root / "none")
    write_result(root / "rome", "rome", forget=[0.0, 0.0, 0.5, 0.0], retain=[0.5, 1.0, 0.0, 0.0, 0.5])
    write_result(root / "rome_m5", "rome", {"merge": 5}, forget=[0.5, 0.0, 0.0, 0.5])
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ results

def test_a_results_file_reads_into_a_run(results_dir):
    run = read_run(next((results_dir / "rome_m5").rglob("results_*.json")))
    assert (run.method, run.options, run.label) == ("rome", {"merge": "5"}, "rome (merge=5)")
    assert (run.dataset, run.forget_size, run.seed) == ("tofu_factual", 4, 0)
    assert run.split_value("forget", "rouge1_recall") == pytest.approx(0.25)
    assert run.composite() == pytest.approx(1 - 0.25 + 0.6)
    assert [d["generation"] for d in run.samples["tofu_forget"]][:2] == ["answer rome 0", "answer rome 2"]
    assert run.card["run_card"]["evaluation"]["seconds"] == 80.0


# ------------------------------------------------------------------ report

def test_report_writes_tables_with_bootstrap_intervals(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, _ = run_cli(capsys, "report", str(results_dir), "--out", str(out), "--no-figures")
    assert code == 0
    md = (out / "report.md").read_text()
    assert "Table 1" in md and "Table 2" in md and "rome (merge=5)" in md
    rows = {r["label"]: r for r in csv.DictReader(open(out / "table1.csv"))}
    assert list(rows) == ["none", "rome", "rome (merge=5)"]  # none first, plain before variants
    none = rows["none"]
    assert float(none["forget_rouge1_recall"]) == pytest.approx(0.625)
    assert float(none["forget_rouge1_recall_low"]) <= 0.625 <= float(none["forget_rouge1_recall_high"])
    assert float(none["forget_rouge1_recall_low"]) < float(none["forget_rouge1_recall_high"])
    assert none["ci"] == "bootstrap"
    assert float(none["composite"]) == pytest.approx(1 - 0.625 + 0.6)
    # the rephrase increase is paired per row: every rephrase value is half its forget value
    t2 = {r["label"]: r for r in csv.DictReader(open(out / "table2.csv"))}
    assert float(t2["none"]["rephrase_rouge1_recall_increase"]) == pytest.approx(-0.3125)
    assert float(t2["none"]["rephrase_rouge1_recall_increase_high"]) <= 0.0
    cards = list(csv.DictReader(open(out / "runcards.csv")))
    assert cards[0]["edit_s"] == "12.5" and cards[0]["eval_peak_rss_gib"] == "3.0"
    assert cards[0]["targets_reached"] == "39/40"  # the editor's own verification, from the results
    assert "| targets reached |" in (out / "report.md").read_text()
    case = (out / "case_study.md").read_text()
    # TOFU's questions are the publisher's: named by row and hash, never quoted
    assert "Question 0?" not in case and "gold 0" not in case and "**Q (row 0, question sha256 " in case
    assert "answer rome 0" in case and "answer none 0" in case
    assert json.loads((out / "bootstrap.json").read_text())["iters"] == 1000


def test_the_case_study_quotes_e2us_own_and_the_users_questions(tmp_path, capsys):
    root = tmp_path / "results"
    path = write_result(root / "a", "none")
    data = json.loads(path.read_text())
    data["config"]["e2u"]["split"]["dataset"] = "my_facts.jsonl"
    path.write_text(json.dumps(data))
    assert run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures")[0] == 0
    case = (tmp_path / "r" / "case_study.md").read_text()
    assert "**Q (row 0):** Question 0?" in case and "**gold:** gold 0" in case


def test_targets_reached_adds_what_vstar_reached_only_where_every_run_recorded_it():
    from types import SimpleNamespace

    from e2u_experiments.report import targets_reached

    card = lambda **t: SimpleNamespace(card={"targets": t})  # noqa: E731
    assert targets_reached([card(reached=3, requests=40, v_star_reached=38),
                            card(reached=5, requests=40, v_star_reached=40)]) == "8/80 (v* 78)"
    # an older result without the v* count: the sum over the seeds would be partial, so none
    assert targets_reached([card(reached=3, requests=40, v_star_reached=38),
                            card(reached=5, requests=40)]) == "8/80"
    assert targets_reached([SimpleNamespace(card={})]) == "–"


def test_report_has_a_refusal_quality_table_for_runs_that_carry_it(results_dir, tmp_path, capsys):
    write_result(results_dir / "alphaedit_self", "alphaedit", {"target": "self"},
                 forget=[0.0, 0.0, 1.0, 0.5], rephrase=[0.0, 1.0, 1.0, 0.0], refusal=True)
    out = tmp_path / "report"
    assert run_cli(capsys, "report", str(results_dir), "--out", str(out), "--no-figures")[0] == 0
    rows = {r["label"]: r for r in csv.DictReader(open(out / "refusal.csv"))}
    assert list(rows) == ["alphaedit (target=self)"]  # the older runs have no refusal metrics
    row = rows["alphaedit (target=self)"]
    assert float(row["forget_refusal_rate"]) == pytest.approx(0.5)
    assert float(row["forget_answer_leak"]) == pytest.approx(0.25)
    assert float(row["rephrase_refusal_rate"]) == pytest.approx(0.5)
    assert float(row["rephrase_entity_mention"]) == pytest.approx(0.5)
    assert float(row["retain_rouge1_recall"]) == pytest.approx(0.6)
    assert float(row["retain_refusal_rate"]) == pytest.approx(0.2)  # over-refusal: 1 of 5
    assert float(row["forget_refusal_rate_low"]) < float(row["forget_refusal_rate_high"])
    md = (out / "report.md").read_text()
    assert "Refusal quality" in md and "| alphaedit (target=self) | 0.375" in md


def test_without_refusal_metrics_there_is_no_refusal_table(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli(capsys, "report", str(results_dir), "--out", str(out), "--no-figures")[0] == 0
    assert not (out / "refusal.csv").exists() and "Refusal quality" not in (out / "report.md").read_text()


def recovery_results(root: Path, samples: bool = True) -> Path:
    """ga without attack, after 4-bit quantisation and after relearning half its forget rows."""
    write_result(root / "none", lens=True, samples=samples)
    write_result(root / "ga", "ga", forget=[0.0, 0.5, 0.0, 0.0], lens=True, samples=samples)
    write_result(root / "ga_q4", "ga", {"attack": "quantize", "attack_bits": "4"},
                 forget=[1.0, 0.5, 0.0, 0.0], lens=True, samples=samples)
    write_result(root / "ga_relearn", "ga", {"attack": "relearn", "attack_data": "forget_half"},
                 forget=[0.0, 1.0, 0.0, 0.5], evaluated=[1, 3], lens=True, samples=samples)
    return root


def test_report_has_a_recovery_table_against_the_same_forget_rows(tmp_path, capsys):
    root = recovery_results(tmp_path / "results")
    out = tmp_path / "report"
    assert run_cli(capsys, "report", str(root), "--out", str(out), "--no-figures")[0] == 0
    md = (out / "report.md").read_text()
    table = md.split("### Recovery")[1].split("###")[0]
    head, _, ga = [line for line in table.splitlines() if line.startswith("|")]
    assert head == ("| method | forget R1, no attack | forget lens_hit@10, no attack | forget R1 after "
                    "attack=quantize, attack_bits=4 (change) | forget R1 after attack=relearn, "
                    "attack_data=forget_half (change) |")
    cells = [c.strip() for c in ga.strip("|").split("|")]
    assert cells[0] == "ga" and cells[1].startswith("0.125 [") and cells[2].startswith("0.250 [")
    # quantised: all four rows, against 0.125; relearned: rows 2 and 6 only, against ga's 0.25 there
    assert cells[3].startswith("0.375 [") and cells[3].endswith("(+0.250)")
    assert cells[4].startswith("0.750 [") and cells[4].endswith("(+0.500)")
    rows = list(csv.DictReader(open(out / "recovery.csv")))
    relearn = next(r for r in rows if r["attack"].startswith("attack=relearn"))
    assert relearn["forget_rouge1_no_attack_same_rows"] == "0.250000"
    assert relearn["lens_metric"] == "lens_hit@10" and relearn["forget_lens_no_attack"] == "0.250000"


def test_without_samples_the_relearn_change_is_not_guessed(tmp_path, capsys):
    root = recovery_results(tmp_path / "results", samples=False)
    run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures")
    ga = [line for line in (tmp_path / "r" / "report.md").read_text().split("### Recovery")[1]
          .splitlines() if line.startswith("| ga ")][0]
    quantised, relearned = ga.strip(" |").split(" | ")[3:5]
    assert quantised.endswith("(+0.250)") and not relearned.endswith(")")


def test_without_attacks_there_is_no_recovery_table(results_dir, tmp_path, capsys):
    run_cli(capsys, "report", str(results_dir), "--out", str(tmp_path / "r"), "--no-figures")
    assert "Recovery" not in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / "recovery.csv").exists()


@pytest.mark.skipif(not figures.available(), reason="pip install e2u[report]")
def test_recovery_figure(tmp_path, capsys):
    root = recovery_results(tmp_path / "results")
    run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"))
    (figure,) = (tmp_path / "r").glob("recovery_*.png")
    assert f"![{figure.name}]({figure.name})" in (tmp_path / "r" / "report.md").read_text()


def test_report_is_reproducible_and_seeded(results_dir, tmp_path, capsys):
    outs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_cli(capsys, "report", str(results_dir), "--out", str(tmp_path / name), "--no-figures", "--seed", seed)
        outs.append((tmp_path / name / "table1.csv").read_text())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_several_seeds_give_mean_and_spread(tmp_path, capsys):
    root = tmp_path / "results"
    write_result(root / "s0", "memit", seed=0, forget=[0.0, 0.0, 0.0, 0.0])
    write_result(root / "s1", "memit", seed=1, forget=[0.5, 0.5, 0.5, 0.5])
    run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures")
    (row,) = csv.DictReader(open(tmp_path / "r" / "table1.csv"))
    assert row["seeds"] == "0 1"
    assert float(row["forget_rouge1_recall"]) == pytest.approx(0.25)
    assert float(row["forget_rouge1_recall_seed_sd"]) == pytest.approx(0.35355, abs=1e-4)
    assert "(2 seeds)" in (tmp_path / "r" / "report.md").read_text()


def test_forget_seeds_are_pooled_with_mean_spread_and_each_seed_beside(tmp_path, capsys):
    """Three forget seeds: the pooled row is the mean ± sd of the seeds, each seed keeps its own
    interval, retain is compared with none's on the same forget seed; a method run at one forget
    seed only is no pooled row."""
    root = tmp_path / "results"
    for s, (forget, retain, none_retain) in enumerate([([0.0] * 4, [1.0, 1.0, 0.5, 0.5, 0.5], [1.0] * 5),
                                                       ([0.5] * 4, [0.5] * 5, [1.0, 1.0, 0.5, 0.5, 0.5]),
                                                       ([0.25] * 4, [0.5] * 5, [0.5] * 5)]):
        write_result(root / f"none{s}", "none", seed=s, forget_seed=s, retain=none_retain)
        write_result(root / f"alpha{s}", "alphaedit", seed=s, forget_seed=s, forget=forget, retain=retain)
    write_result(root / "rome0", "rome", seed=0, forget_seed=0)
    code, _, _ = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures")
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "r" / "seeds.csv")))
    assert [(r["label"], r["forget_seed"]) for r in rows] == [
        ("none", "0 1 2"), ("none", "0"), ("none", "1"), ("none", "2"),
        ("alphaedit", "0 1 2"), ("alphaedit", "0"), ("alphaedit", "1"), ("alphaedit", "2")]
    pooled, seed0 = rows[4], rows[5]
    assert float(pooled["forget_rouge1_recall"]) == pytest.approx(0.25)
    assert float(pooled["forget_rouge1_recall_seed_sd"]) == pytest.approx(0.25)
    assert float(seed0["forget_rouge1_recall_low"]) == float(seed0["forget_rouge1_recall_high"]) == 0.0
    # retain / none per seed: 0.7/1.0, 0.5/0.7, 0.5/0.5
    ratios = [0.7, 0.5 / 0.7, 1.0]
    assert float(pooled["retain_vs_none"]) == pytest.approx(sum(ratios) / 3)
    assert float(rows[6]["retain_vs_none"]) == pytest.approx(ratios[1])
    assert pooled["targets_reached"] == "117/120" and seed0["targets_reached"] == "39/40"
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Across forget seeds: smollm2-135m-instruct, tofu_factual, 4 forget rows, forget seeds 0, 1, 2" in report
    assert report.index("Across forget seeds") < report.index("### Table 1")
    assert "| **alphaedit** | 0 1 2 | 0.250 ± 0.250 [" in report
    assert "| ↳ seed 1 |  | 0.500 [0.500, 0.500] |" in report


def test_a_leaderboard_reports_like_its_runs_and_a_folder_run_replaces_its_entry(tmp_path, capsys):
    """A board's entries (numbers and per-document scores) give the same tables as the results
    they were written from; a results folder's run of the same identity is used instead of its
    entry; runs of a board and of folders pool across forget seeds together."""
    root = tmp_path / "results"
    for s in (0, 1):
        write_result(root / f"none{s}", "none", seed=s, forget_seed=s)
        write_result(root / f"gd{s}", "gd", seed=s, forget_seed=s, forget=[0.0, 0.5 * s, 0.0, 0.0])
    board = tmp_path / "board.yaml"
    assert run_cli(capsys, "leaderboard", str(root), "--out", str(board))[0] == 0
    assert run_cli(capsys, "report", str(root), "--out", str(tmp_path / "a"), "--no-figures")[0] == 0
    assert run_cli(capsys, "report", str(board), "--out", str(tmp_path / "b"), "--no-figures")[0] == 0
    for name in ("table1.csv", "table2.csv", "seeds.csv"):
        from_runs = [{k: v for k, v in r.items() if k != "file"} for r in csv.DictReader(open(tmp_path / "a" / name))]
        from_board = [{k: v for k, v in r.items() if k != "file"} for r in csv.DictReader(open(tmp_path / "b" / name))]
        assert from_runs == from_board, name
    assert (tmp_path / "b" / "runcards.csv").read_text().count("39/40") == 4  # the editors' reach
    assert "No answers in these results" in (tmp_path / "b" / "case_study.md").read_text()
    newer = tmp_path / "newer"
    write_result(newer / "gd1", "gd", seed=1, forget_seed=1, forget=[1.0, 1.0, 1.0, 1.0])
    write_result(newer / "gd2", "gd", seed=2, forget_seed=2, forget=[0.5, 0.5, 0.5, 0.5])
    code, out, _ = run_cli(capsys, "report", str(board), str(newer), "--out", str(tmp_path / "c"), "--no-figures")
    assert code == 0 and "1 leaderboard entries are runs of the results folders too" in out
    pooled = next(r for r in csv.DictReader(open(tmp_path / "c" / "seeds.csv"))
                  if r["label"] == "gd" and r["forget_seed"] == "0 1 2")
    assert float(pooled["forget_rouge1_recall"]) == pytest.approx((0.0 + 1.0 + 0.5) / 3)


def test_report_of_one_dataset_among_several(tmp_path, capsys):
    """--dataset keeps the runs on the named datasets; a name no run has is one line naming
    the datasets present."""
    root = tmp_path / "results"
    write_result(root / "a", "none")
    other = write_result(root / "b", "gd")
    data = json.loads(other.read_text())
    data["config"]["e2u"]["split"]["dataset"] = "my_facts"
    other.write_text(json.dumps(data))
    assert run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures",
                   "--dataset", "my_facts")[0] == 0
    assert [r["method"] for r in csv.DictReader(open(tmp_path / "r" / "table1.csv"))] == ["gd"]
    code, out, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "s"), "--dataset", "tofu")
    assert code == 2 and not (tmp_path / "s").exists()
    assert "--dataset 'tofu' matches no run; the runs are on: my_facts, tofu_factual" in out + err


def test_report_of_one_forget_seed_among_several(tmp_path, capsys):
    """--forget-seed keeps the runs whose forget set that seed drew; a seed no run has is one
    line naming the seeds present."""
    root = tmp_path / "results"
    write_result(root / "a", "none")
    write_result(root / "b", "gd", forget_seed=1)
    assert run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures",
                   "--forget-seed", "1")[0] == 0
    assert [r["method"] for r in csv.DictReader(open(tmp_path / "r" / "table1.csv"))] == ["gd"]
    code, out, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "s"), "--forget-seed", "7")
    assert code == 2 and not (tmp_path / "s").exists()
    assert "--forget-seed 7 matches no run; the runs drew their forget sets with seeds 0, 1" in out + err


def test_one_forget_seed_has_no_pooled_section(results_dir, tmp_path, capsys):
    run_cli(capsys, "report", str(results_dir), "--out", str(tmp_path / "r"), "--no-figures")
    assert "Across forget seeds" not in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / "seeds.csv").exists()


def test_without_samples_the_interval_is_the_marked_normal_one(tmp_path, capsys):
    root = tmp_path / "results"
    write_result(root / "a", samples=False)
    run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"), "--no-figures")
    (row,) = csv.DictReader(open(tmp_path / "r" / "table1.csv"))
    assert row["ci"] == "normal"
    assert float(row["forget_rouge1_recall_low"]) == pytest.approx(0.625 - 1.96 * 0.01, abs=1e-3)
    assert "[≈" in (tmp_path / "r" / "report.md").read_text()


def test_report_without_matplotlib_writes_tables_and_says_so(results_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(figures, "available", lambda: False)
    code, stdout, _ = run_cli(capsys, "report", str(results_dir), "--out", str(tmp_path / "r"))
    assert code == 0 and (tmp_path / "r" / "table1.csv").is_file()
    lines = [line for line in stdout.splitlines() if "need matplotlib" in line]
    assert lines == ["e2u: figures need matplotlib: pip install e2u[report] (tables written without them)"]
    assert not list((tmp_path / "r").glob("*.png"))


@pytest.mark.skipif(not figures.available(), reason="pip install e2u[report]")
def test_report_figures(results_dir, tmp_path, capsys):
    for size in (2, 8):  # Fig. 4 needs two forget-set sizes
        write_result(results_dir / f"n{size}", "rome", forget=[0.0] * size, forget_size=size)
    run_cli(capsys, "report", str(results_dir), "--out", str(tmp_path / "r"))
    names = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert any(n.startswith("fig3_composite_") for n in names)
    assert any(n.startswith("fig3_radar_") for n in names)
    assert any(n.startswith("fig4_forget_size_") for n in names)
    assert any(n.startswith("fig6_merge_") for n in names)  # rome at merge 1 and 5
    assert all((tmp_path / "r" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_fig4_takes_one_forget_seed_per_size(tmp_path):
    """Three forget seeds at one size and a second size at seed 0: the curve is seed 0's, one
    point per size (another seed's forget set is another experiment)."""
    from e2u_experiments.report import build_blocks, load_sources

    root = tmp_path / "results"
    for s in (0, 1, 2):
        write_result(root / f"gd{s}", "gd", seed=s, forget_seed=s, forget_size=4)
    write_result(root / "gd8", "gd", forget=[0.0] * 8, forget_size=8)
    blocks = build_blocks(load_sources([str(root)], log=lambda *_: None), 100, 0)
    seed, points = figures.forget_size_points(blocks, "smollm2-135m-instruct", "tofu_factual")
    assert seed == 0 and [size for size, _ in points["gd"]] == [4, 8]


@pytest.mark.skipif(not figures.available(), reason="pip install e2u[report]")
def test_radar_lines_stay_distinguishable_beyond_ten_methods(tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    root = tmp_path / "results"
    for number in range(12):
        write_result(root / f"m{number}", f"method{number:02d}")
    styles = []
    real_plot = matplotlib.axes.Axes.plot

    def record(self, *args, **kwargs):
        styles.append((kwargs.get("color"), kwargs.get("linestyle")))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    run_cli(capsys, "report", str(root), "--out", str(tmp_path / "r"))
    assert len(styles) >= 12 and len(set(styles[-12:])) == 12


# ------------------------------------------------------------------ leaderboard and regress

@pytest.fixture
def board(results_dir, tmp_path, capsys) -> Path:
    path = tmp_path / "board.yaml"
    assert run_cli(capsys, "leaderboard", str(results_dir), "--out", str(path))[0] == 0
    return path


def test_results_pass_their_own_leaderboard(board, results_dir, capsys):
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir))
    assert code == 0, out
    assert "all 45 numbers of 3 run(s) within tolerance" in out


def test_a_perturbed_number_fails_and_is_named(board, results_dir, capsys):
    path = next((results_dir / "rome_m5").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"]["tofu_retain"]["mrr,none"] += 0.001
    path.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir))
    assert code == 1
    assert "1 of 45 numbers outside tolerance" in out
    (line,) = [l for l in out.splitlines() if "tofu_retain/mrr" in l]
    assert "rome (merge=5)" in line and "0.4" in line and "1e-06" in line and "+0.001" in line
    # a wider tolerance (across machines) accepts it
    assert run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir),
                   "--tolerance", "0.01")[0] == 0


def test_a_missing_run_fails_unless_allowed(board, results_dir, capsys):
    import shutil

    shutil.rmtree(results_dir / "rome")
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir))
    assert code == 1 and "missing: no result for smollm2-135m-instruct rome tofu_factual" in out
    assert run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir),
                   "--allow-missing")[0] == 0


def test_run_card_differences_are_notes(board, results_dir, capsys):
    path = next((results_dir / "none").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["config"]["e2u"]["packages"]["torch"] = "2.14.0"
    path.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir))
    assert code == 0 and "run card differs: packages: torch 2.13.0+cpu -> 2.14.0" in out


def test_the_leaderboard_keeps_the_fingerprint_and_regress_names_what_differs(board, results_dir, capsys):
    entry = next(e for e in yaml.safe_load(board.read_text())["entries"] if e["method"] == "none")
    assert entry["run_card"]["fingerprint"]["device_name"] == "Some CPU @ 2.0GHz"
    path = next((results_dir / "none").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["config"]["e2u"]["fingerprint"].update(device_type="cuda", device_name="NVIDIA H200", threads=16)
    path.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir))
    (note,) = [line for line in out.splitlines() if "run card differs: fingerprint" in line]
    assert code == 0 and "device_name Some CPU @ 2.0GHz -> NVIDIA H200" in note
    assert "device_type cpu -> cuda" in note and "threads 2 -> 16" in note and "dtype" not in note
    assert "none tofu_factual n=4 seed=0: statistical mode (fingerprint differs in device_name, " \
           "device_type, threads)" in out


# ------------------------------------------------------------------ statistical mode


def _other_machine(results_dir: Path, method_dir: str = "none", **changes) -> dict:
    """Mark a run as computed on another machine (a GPU); returns its results JSON for edits."""
    path = next((results_dir / method_dir).rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["config"]["e2u"]["fingerprint"].update(device_type="cuda", device_name="NVIDIA H200", **changes)
    path.write_text(json.dumps(data))
    return data


def _scale_samples(results_dir: Path, method_dir: str, task: str, metric: str, factor: float,
                   only_doc: int | None = None) -> None:
    """Multiply one metric of a run's per-document samples (and its mean in the results)."""
    samples = next((results_dir / method_dir).rglob(f"samples_{task}_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows:
        if only_doc is None or row["doc_id"] == only_doc:
            row[metric] *= factor
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = next((results_dir / method_dir).rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"][task][f"{metric},none"] = sum(r[metric] for r in rows) / len(rows)
    path.write_text(json.dumps(data))


@pytest.fixture
def big_results(tmp_path) -> Path:
    """Runs with 40 forget and 40 retain documents (the bootstrap needs more than a handful)."""
    root = tmp_path / "big"
    forget = [((i * 7) % 10) / 10 for i in range(40)]
    retain = [((i * 3) % 10) / 10 + 0.05 for i in range(40)]
    write_result(root / "none", forget=forget, retain=retain)
    write_result(root / "rome", "rome", forget=[f / 2 for f in forget], retain=retain)
    return root


@pytest.fixture
def big_board(big_results, tmp_path, capsys) -> Path:
    path = tmp_path / "big.yaml"
    code, out, _ = run_cli(capsys, "leaderboard", str(big_results), "--out", str(path))
    assert code == 0 and "per-document scores of 2 to" in out
    assert (tmp_path / "big.docs.json").is_file()
    return path


def test_another_machine_with_the_same_documents_passes_statistical_mode(big_board, big_results, capsys):
    _other_machine(big_results)
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results", str(big_results))
    assert code == 0, out
    assert ("all 15 numbers of 1 run(s) within tolerance; 1 run(s) in statistical mode: none of 14 "
            "metrics worse beyond its margin") in out


def test_float_noise_and_one_flipped_document_do_not_fail(big_board, big_results, capsys):
    _other_machine(big_results, threads=16)
    _scale_samples(big_results, "none", "tofu_retain", "prob", 1 + 1e-6)
    _scale_samples(big_results, "none", "tofu_retain", "rouge1_recall", 0.0, only_doc=3)
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results", str(big_results))
    assert code == 0, out
    # the same changes fail exact mode: it is the wrong test across machines
    assert run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results", str(big_results),
                   "--mode", "exact")[0] == 1


def test_halved_retain_fails_statistical_mode_and_is_named(big_board, big_results, capsys):
    _other_machine(big_results)
    _scale_samples(big_results, "none", "tofu_retain", "rouge1_recall", 0.5)
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results", str(big_results))
    assert code == 1
    (line,) = [l for l in out.splitlines() if "tofu_retain/rouge1_recall" in l and l.rstrip().endswith("worse")]
    assert "none tofu_factual" in line and "0.05" in line
    # every paired metric is reported with its difference, interval and decision, not only the worse one
    decided = [l for l in out.splitlines() if l.rstrip().endswith((" ok", " worse"))]
    assert len(decided) == 14 and sum(l.rstrip().endswith("worse") for l in decided) == 1
    (summary,) = [l for l in out.splitlines() if "metrics worse beyond their margin" in l]
    assert "tofu_retain/rouge1_recall -0." in summary and "margin 0.05" in summary
    # a better number never fails: the same change on the forget side is less knowledge
    _scale_samples(big_results, "none", "tofu_retain", "rouge1_recall", 2.0)
    _scale_samples(big_results, "none", "tofu_forget", "rouge1_recall", 0.5)
    assert run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results", str(big_results))[0] == 0


def test_statistical_mode_bad_input_is_one_line(big_board, big_results, tmp_path, capsys):
    (tmp_path / "big.docs.json").rename(tmp_path / "elsewhere.json")
    code, _, err = run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results",
                           str(big_results), "--mode", "statistical")
    assert code == 2 and "has no per-document scores" in err and "--mode exact" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "elsewhere.json").rename(tmp_path / "big.docs.json")
    # other documents than the leaderboard's
    samples = next((big_results / "rome").rglob("samples_tofu_forget_*.jsonl"))
    samples.write_text("".join(line + "\n" for line in samples.read_text().splitlines()[:30]))
    code, _, err = run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results",
                           str(big_results), "--mode", "statistical")
    assert code == 2 and "tofu_forget evaluates other documents than the leaderboard (30 vs 40, 30 in common)" in err
    # a malformed fingerprint in the leaderboard
    board = yaml.safe_load(big_board.read_text())
    board["entries"][0]["run_card"]["fingerprint"] = "a GPU"
    big_board.write_text(yaml.safe_dump(board))
    code, _, err = run_cli(capsys, "regress", "--leaderboard", str(big_board), "--results", str(big_results))
    assert code == 2 and "run_card.fingerprint must be a mapping" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line, status 2
        main(["regress", "--leaderboard", str(big_board), "--results", str(big_results), "--mode", "fast"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("text, problem", [
    ("entries: [", "is not valid YAML"),
    ("- 1\n- 2\n", "must be a mapping with 'format' and 'entries'"),
    ("format: other/1\nentries: []\n", "format is 'other/1'; expected 'e2u-leaderboard/1'"),
    ("format: e2u-leaderboard/1\nentries: []\n", "'entries' must be a non-empty list"),
    ("format: e2u-leaderboard/1\nentries: [{model: m, method: rome}]\n", "entry 1 lacks metrics"),
    ("format: e2u-leaderboard/1\nentries: [{model: m, method: rome, metric: {}}]\n",
     "entry 1 lacks metrics"),
    ("format: e2u-leaderboard/1\nentries: [{model: m, method: rome, metrics: {t: {r: {value: x, tolerance: 0}}}}]\n",
     "entry 1 (rome): t/r needs a numeric 'value'"),
    ("format: e2u-leaderboard/1\nentries: [{model: m, method: rome, metrics: {t: {r: {value: 1}}}}]\n",
     "entry 1 (rome): t/r needs a 'tolerance' >= 0 (got None)"),
    ("format: e2u-leaderboard/1\nentries: [{model: m, method: rome, colour: red, metrics: {t: {r: {value: 1, tolerance: 0}}}}]\n",
     "entry 1 (rome) has unknown key(s) colour"),
])
def test_a_malformed_leaderboard_is_one_line_naming_file_and_problem(text, problem, results_dir, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run_cli(capsys, "regress", "--leaderboard", str(path), "--results", str(results_dir))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"e2u: error: leaderboard file {path}: ")
    assert problem in err


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"config": {}}', "no 'results' mapping of tasks"),
    ('{"results": {"tofu_forget": {"rouge1_recall,none": "high"}}}', "tofu_forget rouge1_recall,none = 'high' is not a number"),
    ('{"results": {"tofu_forget": {}}, "config": {"model_args": 7}}', "config.model_args is a int"),
])
def test_a_malformed_results_file_is_one_line_naming_file_and_problem(content, problem, board, tmp_path, capsys):
    bad = tmp_path / "bad" / "m" / "results_2026.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    for argv in (["regress", "--leaderboard", str(board), "--results", str(tmp_path / "bad")],
                 ["report", str(tmp_path / "bad"), "--out", str(tmp_path / "r"), "--no-figures"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1
        assert err.startswith(f"e2u: error: results file {bad}: ") and problem in err


def test_an_empty_results_folder_is_one_line(board, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(tmp_path / "empty"))
    assert code == 2 and "no results_*.json under it" in err


# ------------------------------------------------------------------ sweep

def sweep_file(tmp_path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_sweep_grid_is_a_union_of_products(tmp_path):
    path = sweep_file(tmp_path, """\
        output_dir: out
        common: {model: smollm2-135m-instruct, forget_size: 40, seed: 0}
        grid:
          - method: [none, rome, memit]
          - method: [rome, memit]
            merge: [1, 5]
            layers: [[3, 4]]
          - method: [none]
        """)
    config = SweepConfig.load(path)
    ids = [r.run_id for r in config.runs]
    assert len(ids) == 7 == len(set(ids))  # the second 'none' is the same run
    assert ids[0] == "smollm2-135m-instruct__tofu_factual__none__forget_size-40__seed-0"
    assert "smollm2-135m-instruct__tofu_factual__rome__forget_size-40__layers-3+4__merge-5__seed-0" in ids
    run = config.runs[-1]
    assert run.model_args == {"pretrained": "smollm2-135m-instruct", "forget_size": 40, "seed": 0,
                              "method": "memit", "merge": 5, "layers": [3, 4]}
    cmd = config.command(run, Path("x"))
    assert cmd[cmd.index("--tasks") + 1] == "tofu_factual" and "--log_samples" in cmd
    assert json.loads(cmd[cmd.index("--model_args") + 1]) == run.model_args


@pytest.mark.parametrize("body, problem", [
    ("output_dir: o\ncolour: red\n", "unknown key(s) colour"),
    ("output_dir: o\ngrid: [{method: rome}]\n", "grid block 1, key 'method': give a non-empty list"),
    ("output_dir: o\nlm_eval_args: [--tasks, x]\n", "lm_eval_args must not set --tasks"),
    ("grid: [{method: [rome]}]\n", "no output_dir"),
    ("output_dir: o\ncommon: {pretrained: x}\n", "write the model as 'model'"),
    ("output_dir: o\ngrid: [\n", "not valid YAML"),
])
def test_bad_sweep_config_is_one_line_naming_the_file(tmp_path, capsys, body, problem):
    path = sweep_file(tmp_path, body)
    code, out, err = run_cli(capsys, "sweep", str(path))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"e2u: error: sweep config {path}: ") and problem in err


FAKE_LM_EVAL = """\
import json, sys
from pathlib import Path
args = sys.argv[1:]
model_args = json.loads(args[args.index('--model_args') + 1])
if model_args['method'] == 'broken':
    print('e2u: error: method broken'); sys.exit(1)
out = Path(args[args.index('--output_path') + 1]) / 'm'
out.mkdir(parents=True)
(out / 'results_x.json').write_text(json.dumps({'results': {'t': {'a,none': 1.0}}, 'groups': {}}))
"""


def test_sweep_runs_skips_finished_and_leaves_nothing_of_failures(tmp_path, monkeypatch):
    fake = tmp_path / "fake_lm_eval.py"
    fake.write_text(FAKE_LM_EVAL)
    monkeypatch.setattr(SweepConfig, "command", lambda self, run, out: [
        sys.executable, str(fake), "--model_args", json.dumps(run.model_args), "--output_path", str(out)])
    path = sweep_file(tmp_path, f"""\
        output_dir: {tmp_path / 'out'}
        grid: [{{method: [none, broken, rome]}}]
        """)
    config = SweepConfig.load(path)
    lines: list[str] = []
    assert run_sweep(config, log=lines.append) == 1
    assert [l.split(": ")[1] for l in lines if l.startswith("[")] == [
        "running (method=none; log " + str(tmp_path / "out" / "logs" / (config.runs[0].run_id + ".log")) + ")",
        "done in 0 s; ", "running (method=broken; log " + str(tmp_path / "out" / "logs" / (config.runs[1].run_id + ".log")) + ")",
        "FAILED (exit status 1) after 0 s; last log line", "running (method=rome; log "
        + str(tmp_path / "out" / "logs" / (config.runs[2].run_id + ".log")) + ")", "done in 0 s; "]
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == sorted(["logs", config.runs[0].run_id, config.runs[2].run_id])  # no trace of 'broken'
    record = json.loads((tmp_path / "out" / config.runs[0].run_id / "run.json").read_text())
    assert record["model_args"]["method"] == "none"
    lines.clear()
    assert run_sweep(config, log=lines.append) == 1  # resumed: only the failed run runs again
    assert sum("finished earlier, skipped" in l for l in lines) == 2
    lines.clear()
    assert run_sweep(config, shard=(1, 3), log=lines.append) == 1 and "[2/3]" in lines[0]


def test_shard_argument(capsys, tmp_path):
    path = sweep_file(tmp_path, "output_dir: o\n")
    code, _, err = run_cli(capsys, "sweep", str(path), "--shard", "3/3")
    assert code == 2 and "--shard '3/3' is not accepted" in err


def test_dry_run_prints_commands_with_the_launcher_and_runs_nothing(tmp_path, capsys):
    path = sweep_file(tmp_path, f"""\
        output_dir: {tmp_path / 'out'}
        lm_eval_args: [--device, cpu]
        grid: [{{method: [none, memit]}}]
        """)
    code, out, _ = run_cli(capsys, "sweep", str(path), "--dry-run", "--launcher", "srun -n1 --gres=gpu:1")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and not (tmp_path / "out").exists()
    assert lines[1].startswith("[2/2] smollm2-135m-instruct__tofu_factual__memit: srun -n1 --gres=gpu:1 ")
    assert "--model e2u --model_args" in lines[1] and lines[1].endswith("--log_samples --device cpu")


# ------------------------------------------------------------------ other benchmarks (utility)

def add_benchmarks(result: Path, hellaswag: list[float], mmlu: float, samples: bool = True) -> None:
    """Put other benchmarks into a run's results as lm-eval writes them: ``hellaswag`` (acc and
    acc_norm, per-document samples), ``mmlu`` (a group with subtasks and a subgroup, no samples
    of the group) and ``gsm8k`` (a filtered metric only)."""
    data = json.loads(result.read_text())
    acc = [1.0 - x for x in hellaswag]
    data["results"]["hellaswag"] = {
        "alias": "hellaswag", "acc,none": sum(acc) / len(acc), "acc_stderr,none": 0.02,
        "acc_norm,none": sum(hellaswag) / len(hellaswag), "acc_norm_stderr,none": 0.03}
    subtasks = {"mmlu_astronomy": mmlu - 0.1, "mmlu_virology": mmlu + 0.1}
    for task, value in subtasks.items():
        data["results"][task] = {"alias": task, "acc,none": value, "acc_stderr,none": 0.05}
    data["results"]["mmlu_stem"] = {"alias": "stem", "acc,none": mmlu, "acc_stderr,none": 0.04}
    data["results"]["mmlu"] = {"alias": "mmlu", "acc,none": mmlu, "acc_stderr,none": 0.01}
    data["results"]["gsm8k"] = {"alias": "gsm8k", "exact_match,strict-match": 0.1,
                                "exact_match_stderr,strict-match": 0.01}
    data["groups"]["mmlu"] = data["results"]["mmlu"]
    data["group_subtasks"] = {"tofu_factual": ["tofu_forget", "tofu_retain", "tofu_rephrase"],
                              "mmlu": ["mmlu_stem", "mmlu_virology"], "mmlu_stem": ["mmlu_astronomy"]}
    result.write_text(json.dumps(data))
    if samples:
        stamp = result.name[len("results_"):-len(".json")]
        with open(result.parent / f"samples_hellaswag_{stamp}.jsonl", "w") as handle:
            for doc_id, (a, n) in enumerate(zip(acc, hellaswag)):
                handle.write(json.dumps({"doc_id": doc_id, "doc": {"ctx": f"context {doc_id}"},
                                         "target": 0, "filter": "none", "metrics": ["acc", "acc_norm"],
                                         "acc": a, "acc_norm": n}) + "\n")


HELLASWAG_NONE = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0] * 5
HELLASWAG_ROME = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0] * 5  # two documents in eight lost


@pytest.fixture
def utility_dir(tmp_path) -> Path:
    root = tmp_path / "utility"
    add_benchmarks(write_result(root / "none"), HELLASWAG_NONE, 0.5)
    add_benchmarks(write_result(root / "rome", "rome", forget=[0.0, 0.0, 0.5, 0.0]), HELLASWAG_ROME, 0.44)
    return root


def test_a_run_names_the_other_benchmarks_and_their_headline_metrics(utility_dir):
    run = read_run(next((utility_dir / "rome").rglob("results_*.json")))
    # mmlu's subgroup and subtasks are part of mmlu; tofu_* are e2u's own evaluation
    assert run.utility_tasks() == ["gsm8k", "hellaswag", "mmlu"]
    assert [run.headline(t) for t in run.utility_tasks()] == ["exact_match,strict-match", "acc_norm", "acc"]
    assert run.group() == "tofu_factual" and run.composite() == pytest.approx(1 - 0.125 + 0.6)
    assert [d["acc_norm"] for d in run.samples["hellaswag"]] == HELLASWAG_ROME


def test_a_group_without_a_metric_stands_for_its_children_and_parts_are_no_group():
    from e2u_experiments.runs import Run

    metrics = {"pistol": {"composite": 1.0}, "pistol_forget": {"rouge1_recall": 0.5, "composite": 1.0},
               "pistol_retain": {"rouge1_recall": 0.5, "composite": 1.0},
               "pistol_retain_adjacent": {"rouge1_recall": 0.4}, "pistol_retain_far": {"rouge1_recall": 0.7},
               "e2u_general_mc": {"acc": 0.3, "acc_norm": 0.4}, "arc": {},
               "arc_easy": {"acc": 0.6, "acc_norm": 0.5}, "arc_challenge": {"acc": 0.2}}
    run = Run(Path("r.json"), "m", "none", {}, "pistol", 20, 0, 0, None, metrics,
              group_subtasks={"arc": ["arc_easy", "arc_challenge"],
                              "pistol": ["pistol_forget", "pistol_retain", "pistol_retain_adjacent",
                                         "pistol_retain_far"]})
    assert run.group() == "pistol"
    assert run.utility_tasks() == ["arc_challenge", "arc_easy", "e2u_general_mc"]
    assert run.task_for("retain") == "pistol_retain" and run.task_for("retain_far") == "pistol_retain_far"


def test_report_shows_other_benchmarks_next_to_the_composite_with_change_against_none(utility_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code, _, _ = run_cli(capsys, "report", str(utility_dir), "--out", str(out), "--no-figures")
    assert code == 0
    md = (out / "report.md").read_text()
    assert "### Utility: other benchmarks" in md
    assert "| method | composite | gsm8k exact_match,strict-match (Δ vs none) | hellaswag acc_norm (Δ vs none) " \
           "| mmlu acc (Δ vs none) |" in md
    assert "(baseline)" in md
    rows = {(r["label"], r["task"]): r for r in csv.DictReader(open(out / "utility.csv"))}
    assert set(rows) == {(m, t) for m in ("none", "rome") for t in ("gsm8k", "hellaswag", "mmlu")}
    hella = rows[("rome", "hellaswag")]
    assert hella["metric"] == "acc_norm" and float(hella["value"]) == pytest.approx(3 / 8)
    assert float(hella["change_vs_none"]) == pytest.approx(-2 / 8)
    # paired over documents: only the lost documents move, so the interval stays below zero
    assert float(hella["change_vs_none_low"]) < -2 / 8 < float(hella["change_vs_none_high"]) < 0
    assert float(hella["composite"]) == pytest.approx(1 - 0.125 + 0.6)
    mmlu = rows[("rome", "mmlu")]
    assert float(mmlu["change_vs_none"]) == pytest.approx(-0.06)
    # no samples of the mmlu group: a normal interval from both standard errors
    half_width = 1.959963984540054 * (2 * 0.01 ** 2) ** 0.5
    assert float(mmlu["change_vs_none_high"]) == pytest.approx(-0.06 + half_width, abs=1e-6)
    assert rows[("none", "mmlu")]["change_vs_none"] == ""


def test_report_without_a_none_run_says_there_is_no_change(utility_dir, tmp_path, capsys):
    import shutil

    shutil.rmtree(utility_dir / "none")
    out = tmp_path / "report"
    assert run_cli(capsys, "report", str(utility_dir), "--out", str(out), "--no-figures")[0] == 0
    assert "No `method=none` run in this block, so no change against it." in (out / "report.md").read_text()


def test_the_leaderboard_keeps_other_benchmarks_and_regress_checks_them(utility_dir, tmp_path, capsys):
    board = tmp_path / "board.yaml"
    assert run_cli(capsys, "leaderboard", str(utility_dir), "--out", str(board))[0] == 0
    entries = yaml.safe_load(board.read_text())["entries"]
    assert entries[1]["metrics"]["mmlu"]["acc"]["value"] == pytest.approx(0.44)
    docs = json.loads((tmp_path / "board.docs.json").read_text())["entries"]
    assert all(set(tables["hellaswag"]) == {"docs", "acc", "acc_norm"} for tables in docs.values())
    path = next((utility_dir / "rome").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"]["mmlu"]["acc,none"] = data["groups"]["mmlu"]["acc,none"] = 0.40
    path.write_text(json.dumps(data))
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(utility_dir),
                           "--mode", "exact")
    assert code == 1 and "mmlu/acc" in out and "-0.04" in out


def test_statistical_mode_pairs_other_benchmarks_and_names_what_it_cannot_check(utility_dir, tmp_path, capsys):
    board = tmp_path / "board.yaml"
    assert run_cli(capsys, "leaderboard", str(utility_dir), "--out", str(board))[0] == 0
    _other_machine(utility_dir, "rome")
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(utility_dir))
    assert code == 0, out
    note = next(line for line in out.splitlines() if "not checked in statistical mode" in line)
    assert "gsm8k/exact_match,strict-match" in note and "mmlu/acc" in note and "hellaswag" not in note
    # hellaswag is paired document by document: losing every document fails
    _scale_samples(utility_dir, "rome", "hellaswag", "acc_norm", 0.0)
    code, out, _ = run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(utility_dir))
    assert code == 1 and "hellaswag/acc_norm" in out


# ------------------------------------------------------------------ measured tolerances


def test_tolerances_are_measured_from_repeats_per_metric(results_dir, tmp_path, capsys):
    """A repeat (another batch size) moves the teacher-forced prob by float noise and no generated
    answer: prob gets 10x that difference, ROUGE-1 gets 0; a metric no repeat saw keeps --tolerance."""
    repeats = tmp_path / "repeats"
    write_result(repeats / "none")
    path = next((repeats / "none").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"]["tofu_forget"]["prob,none"] += 3e-7
    data["results"]["tofu_retain"]["prob,none"] -= 1e-7
    del data["results"]["tofu_retain"]["mrr,none"], data["results"]["tofu_forget"]["mrr,none"], \
        data["results"]["tofu_rephrase"]["mrr,none"]
    path.write_text(json.dumps(data))
    board = tmp_path / "measured.yaml"
    code, out, _ = run_cli(capsys, "leaderboard", str(results_dir), "--out", str(board), "--repeats", str(repeats),
                           "--tolerance", "0.5")
    assert code == 0 and "tolerances of" in out
    written = yaml.safe_load(board.read_text())
    measured = written["tolerances"]["metrics"]
    assert measured["prob"]["max_diff"] == pytest.approx(3e-7, rel=1e-3) and measured["prob"]["pairs"] == 3
    assert measured["prob"]["tolerance"] == pytest.approx(3e-6, rel=1e-2)
    assert measured["rouge1_recall"] == {"max_diff": 0.0, "pairs": 3, "tolerance": 0.0}
    assert "mrr" not in measured
    rome = next(e for e in written["entries"] if e["method"] == "rome" and not e["options"])
    assert rome["metrics"]["tofu_forget"]["prob"]["tolerance"] == measured["prob"]["tolerance"]
    assert rome["metrics"]["tofu_forget"]["rouge1_recall"]["tolerance"] == 0.0
    assert rome["metrics"]["tofu_forget"]["mrr"]["tolerance"] == 0.5
    # the results themselves pass; the repeat passes too (it moved prob within 10x its own noise)
    assert run_cli(capsys, "regress", "--leaderboard", str(board), "--results", str(results_dir))[0] == 0


def test_an_update_without_repeats_keeps_the_measured_tolerances(results_dir, tmp_path, capsys):
    """New runs added to a board take the tolerances measured before (they measure the machine's
    noise), instead of falling back to --tolerance."""
    repeats = tmp_path / "repeats"
    write_result(repeats / "none")
    path = next((repeats / "none").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["results"]["tofu_forget"]["prob,none"] += 3e-7
    for split in ("forget", "retain", "rephrase"):
        del data["results"][f"tofu_{split}"]["mrr,none"]
    path.write_text(json.dumps(data))
    old = tmp_path / "old.yaml"
    assert run_cli(capsys, "leaderboard", str(results_dir), "--out", str(old), "--repeats", str(repeats))[0] == 0
    added = tmp_path / "added"
    write_result(added / "gd", "gd", seed=1, forget_seed=1)
    new = tmp_path / "new.yaml"
    assert run_cli(capsys, "leaderboard", str(added), "--out", str(new), "--update", str(old))[0] == 0
    before, after = yaml.safe_load(old.read_text()), yaml.safe_load(new.read_text())
    assert after["tolerances"] == before["tolerances"]
    gd = next(e for e in after["entries"] if e["method"] == "gd")
    assert gd["forget_seed"] == 1
    assert gd["metrics"]["tofu_forget"]["prob"]["tolerance"] == before["tolerances"]["metrics"]["prob"]["tolerance"]
    assert gd["metrics"]["tofu_forget"]["mrr"]["tolerance"] == 1e-6  # no repeat measured mrr's


def test_a_repeat_of_no_leaderboard_run_is_one_line(results_dir, tmp_path, capsys):
    repeats = tmp_path / "repeats"
    write_result(repeats / "other", "memit")
    code, _, err = run_cli(capsys, "leaderboard", str(results_dir), "--out", str(tmp_path / "b.yaml"),
                           "--repeats", str(repeats))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no run of the same identity" in err and "memit" in err


def test_update_replaces_rerun_entries_and_keeps_the_others(results_dir, tmp_path, capsys):
    old = tmp_path / "old.yaml"
    assert run_cli(capsys, "leaderboard", str(results_dir), "--out", str(old))[0] == 0
    rerun = tmp_path / "rerun"
    write_result(rerun / "rome", "rome", forget=[1.0, 1.0, 0.5, 0.0], retain=[0.5, 1.0, 0.0, 0.0, 0.5])
    new = tmp_path / "new.yaml"
    code, out, _ = run_cli(capsys, "leaderboard", str(rerun), "--out", str(new), "--update", str(old))
    assert code == 0 and "1 entries of" in out and "2 kept" in out
    written = yaml.safe_load(new.read_text())
    assert [(e["method"], e["options"]) for e in written["entries"]] == \
        [("none", {}), ("rome", {}), ("rome", {"merge": "5"})]
    rome = written["entries"][1]["metrics"]["tofu_forget"]["rouge1_recall"]["value"]
    assert rome == pytest.approx(0.625)
    docs = json.loads((tmp_path / "new.docs.json").read_text())["entries"]
    assert len(docs) == 3  # the kept entries' per-document scores travel with them
    # the rerun passes the updated board; the old folder still passes for the kept entries
    assert run_cli(capsys, "regress", "--leaderboard", str(new), "--results", str(rerun), "--allow-missing")[0] == 0


def _with_ripple_split(folder: Path, adjacent: int) -> None:
    """Give a run the PISTOL ripple tasks: its first ``adjacent`` retain documents as
    ``tofu_retain_adjacent``, the rest as ``tofu_retain_far`` (samples and means)."""
    out = folder / "smollm2-135m-instruct"
    retain = next(out.glob("samples_tofu_retain_*.jsonl"))
    rows = [json.loads(line) for line in retain.read_text().splitlines()]
    path = next(out.glob("results_*.json"))
    data = json.loads(path.read_text())
    for part, chosen in (("adjacent", rows[:adjacent]), ("far", rows[adjacent:])):
        task = f"tofu_retain_{part}"
        retain.with_name(retain.name.replace("tofu_retain_", f"{task}_")).write_text(
            "".join(json.dumps(r) + "\n" for r in chosen))
        mean = sum(r["rouge1_recall"] for r in chosen) / len(chosen)
        data["results"][task] = {"alias": task, "name": task, "rouge1_recall,none": mean,
                                 "rouge1_recall_stderr,none": 0.01}
    path.write_text(json.dumps(data))


def test_the_report_shows_the_ripple_split_with_its_change_against_none(tmp_path, capsys):
    root = tmp_path / "ripple"
    write_result(root / "none", retain=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    write_result(root / "gd", "gd", retain=[0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    for name in ("none", "gd"):
        _with_ripple_split(root / name, adjacent=2)
    code, _, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "rep"), "--no-figures",
                           "--bootstrap", "200")
    assert code == 0, err
    report = (tmp_path / "rep" / "report.md").read_text()
    lines = report.split("### Ripple")[1].split("\n\n")[1].splitlines()
    assert "retain adjacent ROUGE-1" in lines[0] and "retain far ROUGE-1" in lines[0]
    (gd,) = [line for line in lines if line.startswith("| gd ")]
    # the damage sits on the adjacent contracts: -0.75 there, none on the far ones
    assert "0.250" in gd and "(-0.750" in gd and "(+0.000" in gd
    # a dataset without the split has no ripple table
    plain = tmp_path / "plain"
    write_result(plain / "none")
    assert run_cli(capsys, "report", str(plain), "--out", str(tmp_path / "rep2"), "--no-figures")[0] == 0
    assert "### Ripple" not in (tmp_path / "rep2" / "report.md").read_text()


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_sweep_configs_load(path):
    """Every shipped sweep config expands to runs; a dev config (``*-dev-*``: the tuning runs)
    draws only dev splits, never the reported seeds 0, 1, 2 (tune on dev, report on test).
    A contract dataset (PISTOL) selects its dev split by contract: never the reported ``A_B``."""
    config = SweepConfig.load(path)
    assert config.runs
    if "-dev-" in path.name:
        for run in config.runs:
            args = run.model_args
            assert int(args.get("seed", 0)) >= 100, run.run_id
            if args.get("dataset") == "pistol":
                edges = str(args.get("forget_edge", "A_B")).split("+")
                assert "A_B" not in edges, run.run_id
            else:
                assert int(args.get("forget_seed", 0)) >= 100, run.run_id
