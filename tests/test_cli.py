"""The stock ``lm_eval`` console script in a subprocess, with the start-up hook (as users run it)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import data_mirror

BIN = Path(sys.executable).parent
LM_EVAL = shutil.which("lm_eval", path=str(BIN)) or "lm_eval"


def run(args, env_extra=None, timeout=600):
    env = {**os.environ, "E2U_DATA_DIR": str(data_mirror()), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def local_mc_task(tmp_path_factory):
    """A small local multiple-choice task (a stock output type) outside e2u."""
    folder = tmp_path_factory.mktemp("local_task")
    rows = [{"q": f"Is {n} even?", "choices": ["yes", "no"], "gold": n % 2} for n in range(6)]
    (folder / "parity.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "parity_mc.yaml").write_text(textwrap.dedent(f"""\
        task: parity_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'parity.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{gold}}}}"
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return str(folder)


def results_of(output_dir: Path) -> dict:
    (path,) = output_dir.rglob("results_*.json")
    return json.loads(path.read_text())


def test_e2u_tasks_and_a_stock_task_in_one_command(tiny_model_dir, local_mc_task, tmp_path):
    out = tmp_path / "out"
    proc = run([LM_EVAL, "--model", "e2u", "--model_args", f"pretrained={tiny_model_dir},method=none",
                "--tasks", "tofu_factual,parity_mc", "--include_path", local_mc_task,
                "--limit", "3", "--device", "cpu", "--output_path", str(out), "--log_samples"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results_of(out)
    for task in ("tofu_forget", "tofu_retain", "tofu_rephrase"):
        for metric in ("rouge1_recall", "prob", "mrr", "hit_rate"):
            assert 0.0 <= res["results"][task][f"{metric},none"] <= 1.0
            assert f"{metric}_stderr,none" in res["results"][task]
    assert "composite,none" in res["groups"]["tofu_factual"]
    assert "acc,none" in res["results"]["parity_mc"]
    info = res["config"]["e2u"]
    assert info["method"] == "none" and info["split"]["forget_rows"] == 40
    assert len(list(out.rglob("samples_tofu_forget_*.jsonl"))) == 1
    # What the terminal shows is true for e2u's tasks: the batch size used (no --batch_size given),
    # composite on the group only, none of lm-eval's warnings that do not apply to them.
    assert "batch_size: 64" in proc.stdout and str(res["config"]["batch_size"]) == "64"
    composite_rows = [line for line in proc.stdout.splitlines() if "|composite" in line]
    assert composite_rows and all("tofu_factual" in line for line in composite_rows)
    for warning in ("Custom kwargs", "Higher_is_better", "is missing in"):
        assert warning not in proc.stderr


def test_unknown_method_is_one_line_without_traceback(tmp_path):
    proc = run([LM_EVAL, "--model", "e2u", "--model_args", "method=nope", "--tasks", "tofu_forget",
                "--output_path", str(tmp_path / "out")])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "e2u: error: unknown method 'nope'; available methods: none, rome, memit, alphaedit, ga, gd, kl, dpo, grace, wise")
    assert not (tmp_path / "out").exists()


def test_builtin_hf_model_still_works(tiny_model_dir, local_mc_task):
    proc = run([LM_EVAL, "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}",
                "--tasks", "parity_mc", "--include_path", local_mc_task, "--limit", "2",
                "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity_mc" in proc.stdout


def test_e2u_tasks_with_another_model_class_say_so(tiny_model_dir):
    proc = run([LM_EVAL, "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}",
                "--tasks", "tofu_forget", "--limit", "2", "--device", "cpu"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "only --model e2u serves" in proc.stderr.strip().splitlines()[-1]


def test_wrapper_script_works_without_the_hook(tiny_model_dir, tmp_path):
    wrapper = shutil.which("e2u-lm-eval", path=str(BIN))
    proc = run([wrapper, "--model", "e2u", "--model_args", f"pretrained={tiny_model_dir},dataset=pistol",
                "--tasks", "pistol_forget", "--limit", "2", "--device", "cpu"],
               env_extra={"E2U_DISABLE_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pistol_forget" in proc.stdout and "rouge1_recall" in proc.stdout
    tasks_dir = run([wrapper, "--tasks-dir"]).stdout.strip()
    assert Path(tasks_dir, "tofu_forget.yaml").is_file()


def test_warnings_that_do_not_apply_are_dropped_and_others_kept():
    import logging

    from e2u_models.terminal import CHAT_TEMPLATE_NOTE, E2UWarnings

    keep = E2UWarnings({"tofu_factual", "tofu_forget"})

    def passes(message):
        record = logging.LogRecord("lm_eval.x", logging.WARNING, "f", 1, message, (), None)
        return keep.filter(record), record

    assert not passes("tofu_forget: Custom kwargs can be passed to `--metadata` in console")[0]
    assert passes("mmlu: Custom kwargs can be passed to `--metadata` in console")[0]
    assert not passes("Group 'tofu_factual': metric 'composite,none' is missing in 1/3 tasks.")[0]
    assert passes("Group 'mmlu': metric 'acc,none' is missing in 1/3 tasks.")[0]
    assert not passes("Higher_is_better values for metric prob in group tofu_factual are not consistent.")[0]
    assert passes("Higher_is_better values for metric acc in group mmlu are not consistent.")[0]
    shown, record = passes("pretrained=x-instruct appears to be an\ninstruct or chat variant but chat "
                           "template is not applied.")
    assert shown and record.getMessage() == CHAT_TEMPLATE_NOTE and record.levelno == logging.INFO


def test_printed_table_keeps_composite_on_groups_only():
    from e2u_models.terminal import without_composite_parts

    seen = {}
    table = without_composite_parts(lambda d, column="results", sort=False: seen.setdefault(column, d),
                                    {"tofu_factual", "tofu_forget"})
    results = {"results": {"tofu_factual": {"composite,none": 1.0},
                           "tofu_forget": {"composite,none": 2.0, "composite_stderr,none": 0.1,
                                           "rouge1_recall,none": 0.5},
                           "mmlu": {"composite,none": 0.3}},
               "group_subtasks": {"tofu_factual": ["tofu_forget"]}}
    table(results)
    shown = seen["results"]["results"]
    assert shown["tofu_forget"] == {"rouge1_recall,none": 0.5}
    assert shown["tofu_factual"] == {"composite,none": 1.0} and shown["mmlu"] == {"composite,none": 0.3}
    assert results["results"]["tofu_forget"]["composite,none"] == 2.0  # the results are not changed


def test_pistol_reports_retain_parts_without_changing_the_composite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run([LM_EVAL, "--model", "e2u", "--model_args", f"pretrained={tiny_model_dir},dataset=pistol",
                "--tasks", "pistol", "--limit", "3", "--device", "cpu", "--output_path", str(out),
                "--log_samples"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results_of(out)
    for task in ("pistol_retain_adjacent", "pistol_retain_far"):
        assert 0.0 <= res["results"][task]["rouge1_recall,none"] <= 1.0
        assert "composite,none" not in res["results"][task]
    # the group's composite stays the mean of forget's and retain's shares
    shares = [res["results"][t]["composite,none"] for t in ("pistol_forget", "pistol_retain")]
    assert res["groups"]["pistol"]["composite,none"] == pytest.approx(sum(shares) / 2, abs=1e-12)
    split = res["config"]["e2u"]["split"]
    assert (split["retain_adjacent_rows"], split["retain_far_rows"]) == (260, 120)

    def samples(task):
        (path,) = (p for p in out.rglob(f"samples_{task}_*.jsonl")
                   if p.name[len(f"samples_{task}_"):][:1].isdigit())
        return {json.loads(line)["doc"]["index"]: json.loads(line) for line in path.read_text().splitlines()}

    # retain's first rows are of edge A_C, adjacent to A_B: the same answers in both tasks
    retain, adjacent = samples("pistol_retain"), samples("pistol_retain_adjacent")
    assert set(adjacent) == set(retain)
    for index, doc in adjacent.items():
        assert doc["resps"] == retain[index]["resps"] and doc["rouge1_recall"] == retain[index]["rouge1_recall"]
    assert {d["doc"]["split"] for d in samples("pistol_retain_far").values()} == {"retain_far"}


def test_general_mc_runs_with_the_hf_model(tiny_model_dir, tmp_path):
    """e2u's own utility task is a stock multiple-choice task: lm-eval's hf model runs it."""
    out = tmp_path / "out"
    proc = run([LM_EVAL, "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}",
                "--tasks", "e2u_general_mc", "--limit", "8", "--device", "cpu",
                "--output_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = results_of(out)["results"]["e2u_general_mc"]
    assert 0.0 <= row["acc,none"] <= 1.0 and 0.0 <= row["acc_norm,none"] <= 1.0
    assert "acc_stderr,none" in row


def test_general_mc_next_to_tofu_factual_after_memit(tiny_model_dir, tmp_path):
    """One command: an edited model on its forget/retain tasks and on the utility task (served by
    the e2u model's loglikelihood, HFLM's, on the edited weights)."""
    out = tmp_path / "out"
    args = ("method=memit,forget_size=3,v_num_grad_steps=3,mom2_n_tokens=3000,mom2_max_length=64,"
            "layers=[0]")
    proc = run([LM_EVAL, "--model", "e2u", "--model_args", f"pretrained={tiny_model_dir},{args}",
                "--tasks", "tofu_factual,e2u_general_mc", "--limit", "8", "--device", "cpu",
                "--output_path", str(out), "--log_samples"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = results_of(out)
    assert res["config"]["e2u"]["method"] == "memit"
    assert "composite,none" in res["groups"]["tofu_factual"]
    assert 0.0 <= res["results"]["e2u_general_mc"]["acc_norm,none"] <= 1.0
    assert res["n-samples"]["e2u_general_mc"]["effective"] == 8
    # e2u report reads it as another benchmark, with per-document scores
    from e2u_experiments.runs import read_run

    (path,) = out.rglob("results_*.json")
    read = read_run(path)
    assert read.utility_tasks() == ["e2u_general_mc"] and read.headline("e2u_general_mc") == "acc_norm"
    assert len(read.samples["e2u_general_mc"]) == 8
    assert all(set(d) >= {"acc", "acc_norm"} for d in read.samples["e2u_general_mc"])
