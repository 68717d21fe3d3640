"""The editors' fast paths against their reference computations, and the editor-speed benchmark's
output as the performance page renders it."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from e2u_experiments import docs
from e2u_models.editing.stats import (StatsRequest, TextCorpus, add_upper_gram, corpus_rows,
                                      length_batches, mirrored_upper, second_moments)
from e2u_models.methods.wise import module_inputs
from tests.conftest import TRAINING_TEXT, build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=5), tokenizer


def corpus_order_moments(model, tokenizer, texts, request):
    """The statistics as one pass in corpus order computes them: batches of ``batch_size`` rows
    padded to their longest, float64 products."""
    rows = corpus_rows(tokenizer, TextCorpus.from_texts("unit", texts), request)
    sums = {m: torch.zeros(()) for m in request.modules}
    named = dict(model.named_modules())
    for start in range(0, len(rows), request.batch_size):
        chunk = rows[start: start + request.batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        captured = {}
        handles = [named[m].register_forward_pre_hook(lambda mod, i, m=m: captured.__setitem__(m, i[0]))
                   for m in request.modules]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
        for m in request.modules:
            keys = captured[m][mask.bool()].double()
            sums[m] = sums[m] + keys.T @ keys
    count = sum(map(len, rows))
    return {m: sums[m] / count for m in request.modules}


def test_length_batches_hold_every_row_once_within_the_budget():
    lengths = [5, 17, 3, 17, 9, 1, 12, 30, 2]
    rows = [[0] * n for n in lengths]
    batches = length_batches(rows, token_budget=34)
    assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 34
    longest = [max(lengths[i] for i in batch) for batch in batches]
    assert longest == sorted(longest, reverse=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_length_grouped_moments_match_the_corpus_order_pass(tiny, tmp_path, dtype):
    """Grouping the rows by length changes no term of the sum; the float32 model's activations
    differ in the last bits with a batch's padding, so the two passes agree to float32
    precision (with float32 block products too)."""
    model, tokenizer = tiny
    texts = TRAINING_TEXT[:6] + [" ".join(TRAINING_TEXT[:3]), "short", TRAINING_TEXT[4][:20]]
    request = StatsRequest(modules=MODULES, n_tokens=10_000, max_length=40, batch_size=3, dtype=dtype)
    fast = second_moments(model, tokenizer, TextCorpus.from_texts("unit", texts), request, str(tmp_path),
                          log=lambda *_: None)
    reference = corpus_order_moments(model, tokenizer, texts, request)
    for module in MODULES:
        difference = (fast[module].double() - reference[module]).norm() / reference[module].norm()
        assert difference < 1e-6
        assert fast[module].dtype == getattr(torch, dtype)
        assert torch.equal(fast[module], fast[module].T)


def test_upper_gram_blocks_complete_to_the_full_product():
    rows = torch.randn(50, 23, dtype=torch.float64)
    total = torch.zeros(23, 23, dtype=torch.float64)
    add_upper_gram(total, rows, block=5)
    add_upper_gram(total, rows[:7], block=5)
    expected = rows.T @ rows + rows[:7].T @ rows[:7]
    assert torch.allclose(mirrored_upper(total), expected, rtol=1e-12, atol=1e-12)


def test_wise_module_inputs_equal_the_full_forward_capture(tiny):
    """Stopping at the edited module leaves its inputs bit-identical to a whole forward's."""
    model, tokenizer = tiny
    rows = [tokenizer(t)["input_ids"] for t in TRAINING_TEXT[:5]]
    module = "model.layers.1.mlp.down_proj"
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    captured = {}
    handle = dict(model.named_modules())[module].register_forward_pre_hook(
        lambda mod, inputs: captured.__setitem__("x", inputs[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert torch.equal(module_inputs(model, tokenizer, rows, module), captured["x"][mask.bool()].float())
    # A few rows per forward (GRACE's check, to hold less memory): the same rows in the same order.
    chunked = module_inputs(model, tokenizer, rows, module, batch_size=2)
    assert chunked.shape == captured["x"][mask.bool()].shape
    assert torch.allclose(chunked, captured["x"][mask.bool()].float(), atol=1e-5)


def test_a_pass_keeping_the_upper_cache_only_gives_the_same_outputs_and_upper_cache(tiny):
    """v*'s prefix pass keeps the cache of the layers above the edit only (less memory); every
    output and every kept key/value is bit-identical to the whole cache's."""
    from e2u_models.layers import cache_kept_from, cache_of

    model, tokenizer = tiny
    rows = [tokenizer(t)["input_ids"] for t in TRAINING_TEXT[:4]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, use_cache=True)
        with cache_kept_from(model, 1):
            upper = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.equal(whole.logits, upper.logits)
    kept, full = cache_of(upper).layers, cache_of(whole).layers
    assert kept[0].keys.shape[2] == 0 and kept[0].values.shape[2] == 0
    for index in range(1, len(full)):
        assert torch.equal(kept[index].keys, full[index].keys)
        assert torch.equal(kept[index].values, full[index].values)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("editor_speed", ROOT / "benchmarks" / "editor_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_rows_compare_both_sides_and_render_on_the_performance_page(tmp_path):
    bench = load_benchmark()
    old = {"seconds": 300.0, "peak_rss_gib": 1.5, "sha256": "a", "nll_after": 0.2, "unreached": 0}
    new = {"seconds": 100.0, "peak_rss_gib": 1.4, "sha256": "a", "nll_after": 0.2, "unreached": 0}
    row = bench.compare("wise", old, new)
    assert row["ratio"] == 3.0 and row["identical"] is True
    assert row["old_nll_after"] == row["new_nll_after"] == 0.2
    assert bench.compare("wise", old, {**new, "sha256": "b"})["identical"] is False
    out = tmp_path / docs.BENCHMARK_DIR
    out.mkdir(parents=True)
    (out / "editor_speed.json").write_text(json.dumps([row]), encoding="utf-8")
    block = docs.benchmarks_block(tmp_path)
    assert "| stage | old_s | new_s | ratio |" in block and "| wise | 300.0 | 100.0 | 3.0 |" in block
    assert "editor_speed.py" in block  # the block says how to produce the file


def test_repeated_runs_give_the_median_seconds_and_peak_rss_and_keep_every_run():
    bench = load_benchmark()
    runs = [{"seconds": s, "peak_rss_gib": r, "sha256": "a"} for s, r in ((30.0, 1.8), (28.0, 1.6), (35.0, 1.7))]
    side = bench.median_run(runs)
    assert side["seconds"] == 30.0 and side["peak_rss_gib"] == 1.7
    assert side["runs_s"] == [30.0, 28.0, 35.0] and side["runs_rss_gib"] == [1.8, 1.6, 1.7]
    row = bench.compare("grace", side, bench.median_run(runs[:1]))
    assert row["old_runs_s"] == [30.0, 28.0, 35.0] and "new_runs_s" not in row  # one run: no list


def test_benchmark_reports_how_far_two_results_differ(tmp_path):
    from safetensors.torch import save_file

    bench = load_benchmark()
    save_file({"values": torch.ones(2, 3), "keys": torch.ones(2, 4)}, str(tmp_path / "old.safetensors"))
    save_file({"values": torch.ones(2, 3) * 1.001, "keys": torch.ones(2, 4)}, str(tmp_path / "new.safetensors"))
    save_file({"values": torch.ones(3, 3), "keys": torch.ones(2, 4)}, str(tmp_path / "other.safetensors"))
    assert bench.largest_difference(tmp_path / "old.safetensors", tmp_path / "old.safetensors") == 0.0
    assert bench.largest_difference(tmp_path / "old.safetensors", tmp_path / "new.safetensors") == pytest.approx(1e-3, rel=1e-3)
    # Different tensors (another codebook size) cannot be compared, nor a missing file.
    assert bench.largest_difference(tmp_path / "old.safetensors", tmp_path / "other.safetensors") is None
    assert bench.largest_difference(tmp_path / "old.safetensors", tmp_path / "missing.safetensors") is None
    # Neither side changed a tensor (an edit that left the model as it was): no difference.
    save_file({}, str(tmp_path / "empty_old.safetensors"))
    save_file({}, str(tmp_path / "empty_new.safetensors"))
    assert bench.largest_difference(tmp_path / "empty_old.safetensors", tmp_path / "empty_new.safetensors") == 0.0


def test_editor_speed_rejects_a_set_without_a_value_in_one_line():
    """``--set``/``--old-set`` take KEY=VALUE; anything else is one error line before any worktree or model."""
    import subprocess
    import sys

    for option, value in (("--set", "L2"), ("--old-set", "=3")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "editor_speed.py"), "--old-rev", "HEAD",
                               option, value], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [
            f"editor_speed: --set and --old-set take KEY=VALUE (an hparam and its value), got {value!r}"]


def test_old_set_reaches_the_old_side_only_after_the_shared_settings(tmp_path):
    bench = load_benchmark()
    args = bench.options().parse_args(["--old-rev", "HEAD", "--set", "L2=50", "--set", "v_loss_threshold=0.3",
                                       "--old-set", "v_loss_threshold=0.05"])

    def settings(side):
        command = bench.child_command("alphaedit", side, tmp_path, "cache", args, tmp_path / f"{side}.safetensors")
        return [command[i + 1] for i, word in enumerate(command) if word == "--set"]

    # The old side's own value comes last, so it wins there; the new side never sees it.
    assert settings("old") == ["L2=50", "v_loss_threshold=0.3", "v_loss_threshold=0.05"]
    assert settings("new") == ["L2=50", "v_loss_threshold=0.3"]
