"""Our own CI regression test: a fast SmolLM2 subset against a committed reference.

SmolLM2-135M un-edited (``method=none``) on 4 documents of each TOFU-factual split through the
stock ``lm_eval`` CLI (about 30 s), then ``e2u regress`` against
``leaderboards/ci-smollm2-none-limit4.yaml``, measured with the same command. Any change that
moves a number (prompt rendering, decoding, metrics, the data split) fails here; a perturbed
number in the results fails ``e2u regress``.
"""

from __future__ import annotations

import json

from e2u_experiments.cli import main
from tests.conftest import REPO
from tests.test_cli import LM_EVAL, run
from tests.test_end_to_end import needs_smollm2

REFERENCE = REPO / "leaderboards" / "ci-smollm2-none-limit4.yaml"
COMMAND = ["--model", "e2u", "--model_args", "pretrained=smollm2-135m-instruct,method=none",
           "--tasks", "tofu_factual", "--limit", "4", "--device", "cpu"]


@needs_smollm2
def test_smollm2_subset_matches_the_committed_reference(tmp_path, capsys):
    out = tmp_path / "out"
    proc = run([LM_EVAL, *COMMAND, "--output_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = main(["regress", "--leaderboard", str(REFERENCE), "--results", str(out)])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "within tolerance" in report

    (path,) = out.rglob("results_*.json")
    data = json.loads(path.read_text())
    data["results"]["tofu_retain"]["rouge1_recall,none"] += 0.01
    path.write_text(json.dumps(data))
    assert main(["regress", "--leaderboard", str(REFERENCE), "--results", str(out)]) == 1
    assert "tofu_retain/rouge1_recall" in capsys.readouterr().out
