"""Hardening: determinism across processes, interrupted runs, cache integrity, numerical faults,
no pickle, no network, safe defaults."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from e2u_models.cache import MANIFEST, atomic_directory, verified_entry
from e2u_tasks.errors import E2UError
from tests.conftest import REPO
from tests.test_cli import LM_EVAL, results_of, run

# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", ["none", "memit"])
def test_same_command_twice_gives_bit_identical_metrics_and_cache_keys(tiny_model_dir, tmp_path, method):
    """Two processes (different hash seeds, separate caches): same metrics to the last bit, same
    edit cache key, same edited weights file."""
    runs = []
    for attempt in range(2):
        out, cache = tmp_path / f"out{attempt}", tmp_path / f"cache{attempt}"
        args = (f"pretrained={tiny_model_dir},method={method},forget_size=3,cache_dir={cache}"
                + (",v_num_grad_steps=3,mom2_n_tokens=2000,layers=[0]" if method != "none" else ""))
        proc = run([LM_EVAL, "--model", "e2u", "--model_args", args, "--tasks", "tofu_factual",
                    "--limit", "4", "--device", "cpu", "--output_path", str(out)],
                   env_extra={"PYTHONHASHSEED": str(attempt + 1)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((results_of(out), cache))
    (first, cache_a), (second, cache_b) = runs
    assert first["results"] == second["results"] and first["groups"] == second["groups"]
    if method != "none":
        key_a = first["config"]["e2u"]["method_report"]["details"]["edit_cache"]["key"]
        key_b = second["config"]["e2u"]["method_report"]["details"]["edit_cache"]["key"]
        assert key_a == key_b
        manifests = [json.loads((c / "edits" / key_a / MANIFEST).read_text()) for c in (cache_a, cache_b)]
        assert manifests[0]["files"]["weights.safetensors"] == manifests[1]["files"]["weights.safetensors"]


# ---------------------------------------------------------------- interrupted runs


def edit_in_child(model_dir: str, cache: Path, point: str = "none", marker: Path | None = None):
    args = [sys.executable, "-m", "tests.edit_child", model_dir, str(cache), point,
            str(marker or cache / "marker")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished_hash(proc) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted_hash(tiny_model_dir, tmp_path_factory) -> str:
    return finished_hash(edit_in_child(tiny_model_dir, tmp_path_factory.mktemp("reference")))


@pytest.mark.parametrize("point", ["stats", "edit", "cache-write"])
def test_killed_run_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, point,
                                                           uninterrupted_hash):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    proc = edit_in_child(tiny_model_dir, cache, point, marker)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"the child never reached {point}"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    entries = [p for p in (cache / "edits").iterdir() if not p.name.startswith(".")] \
        if (cache / "edits").exists() else []
    assert entries == []  # nothing final was written for the killed edit
    if point == "cache-write":  # the half-written entry exists only under its temporary name
        (leftover,) = [p for p in (cache / "edits").iterdir() if p.name.startswith(".")]
        an_hour_ago = time.time() - 3700
        os.utime(leftover, (an_hour_ago, an_hour_ago))
    rerun = finished_hash(edit_in_child(tiny_model_dir, cache))
    assert rerun == uninterrupted_hash
    if point == "cache-write":  # the next write of that entry removed the stale leftover
        assert not leftover.exists()


# ---------------------------------------------------------------- cache integrity


def write_entry(folder: Path, files: dict[str, bytes]) -> None:
    with atomic_directory(folder) as tmp:
        for name, content in files.items():
            (tmp / name).write_bytes(content)


@pytest.mark.parametrize("damage", ["truncate", "flip", "extra file", "missing file", "no manifest"])
def test_a_damaged_entry_is_reported_and_removed(tmp_path, damage):
    folder = tmp_path / "entry"
    write_entry(folder, {"a.safetensors": b"0123456789" * 10, "b.json": b"{}"})
    logged = []
    assert verified_entry(folder, logged.append)
    if damage == "truncate":
        (folder / "a.safetensors").write_bytes(b"0123456789" * 9)
    elif damage == "flip":
        (folder / "a.safetensors").write_bytes(b"1123456789" + b"0123456789" * 9)
    elif damage == "extra file":
        (folder / "c.json").write_bytes(b"{}")
    elif damage == "missing file":
        (folder / "b.json").unlink()
    else:
        (folder / MANIFEST).unlink()
    assert not verified_entry(folder, logged.append)
    assert not folder.exists() and len(logged) == 1 and "corrupted" in logged[0]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(E2UError, match=r"is full \(no space left on device\) .*nothing partial") as info:
        with atomic_directory(tmp_path / "edits" / "abc") as tmp:
            (tmp / "half").write_bytes(b"x" * 100)
            full()
    assert "\n" not in str(info.value)
    assert list((tmp_path / "edits").iterdir()) == []


def test_corrupted_statistics_are_recomputed_to_the_same_values(tmp_path):
    from e2u_models.editing.stats import StatsRequest, TextCorpus, second_moments
    from tests.conftest import TRAINING_TEXT, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    corpus = TextCorpus.from_texts("test", TRAINING_TEXT)
    request = StatsRequest(modules=("model.layers.0.mlp.down_proj",), n_tokens=300)
    logged = []
    first = second_moments(model, tokenizer, corpus, request, str(tmp_path), logged.append)
    (entry,) = [p for p in (tmp_path / "stats").iterdir() if not p.name.startswith(".")]
    data = entry / "second_moment.safetensors"
    data.write_bytes(data.read_bytes()[:-64])  # truncated
    again = second_moments(model, tokenizer, corpus, request, str(tmp_path), logged.append)
    assert any("corrupted" in line for line in logged)
    module = request.modules[0]
    assert torch.equal(first[module], again[module])
    assert verified_entry(entry)


PICKLE = re.compile(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bjoblib\b|\bshelve\b|"
                    r"\bmarshal\.|torch\.save\(|torch\.load\(|allow_pickle\s*=\s*True")


def test_no_pickle_anywhere_in_the_code():
    sources = [p for folder in ("e2u_models", "e2u_tasks", "task_configs", "benchmarks", "e2u_experiments")
               for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 20
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in sources
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if PICKLE.search(line)]
    assert offenders == []


def test_caches_hold_only_safetensors_and_json(tiny_model_dir, tmp_path):
    from e2u_models.model import E2ULM

    E2ULM(pretrained=tiny_model_dir, method="memit", cache_dir=str(tmp_path), device="cpu",
          forget_size=3, v_num_grad_steps=2, mom2_n_tokens=1000, layers="[0]")
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json"}


# ---------------------------------------------------------------- numerical faults


def test_nan_during_an_edit_names_the_request_and_caches_nothing(tiny_model_dir, tmp_path):
    from e2u_models.model import E2ULM

    with pytest.raises(E2UError, match=r"edit request row \d+ is not finite .* at step 1") as info:
        E2ULM(pretrained=tiny_model_dir, method="memit", cache_dir=str(tmp_path), device="cpu",
              forget_size=3, v_lr="inf", mom2_n_tokens=1000, layers="[0]")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "edits").exists() or not any((tmp_path / "edits").iterdir())


# ---------------------------------------------------------------- safe defaults


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a network connection."""
    attempts = []

    def refuse(*args, **_kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_a_mirror_means_no_network_even_without_offline_variables(tiny_model_dir, tmp_path,
                                                                  monkeypatch, no_network):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir
    from e2u_models.model import E2ULM
    from e2u_tasks.data import HubFile, resolve_hub_file

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    lm = E2ULM(pretrained=tiny_model_dir, method="memit", cache_dir=str(tmp_path), device="cpu",
               batch_size=4, forget_size=3, v_num_grad_steps=2, mom2_n_tokens=1000, layers="[0]")
    manager = TaskManager(include_path=tasks_dir(), metadata=lm.task_metadata())
    simple_evaluate(model=lm, tasks=["tofu_forget"], limit=2, task_manager=manager)
    with pytest.raises(E2UError, match="not in the data mirror"):
        resolve_hub_file(HubFile("locuslab/TOFU", "not_there.json"))
    assert no_network == []


def test_offline_mode_without_a_mirror_never_connects(monkeypatch, no_network):
    from e2u_tasks.data import HubFile, resolve_hub_file

    monkeypatch.delenv("E2U_DATA_DIR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(E2UError, match="offline mode and not in the local hub cache"):
        resolve_hub_file(HubFile("someone/never-downloaded", "data.json"))
    assert no_network == []


def test_offline_mode_reads_the_local_hub_cache_without_connecting(tmp_path, monkeypatch, no_network):
    """A dataset file downloaded earlier is found in offline mode, even though huggingface_hub was
    imported (and froze its own offline flag) before the variable was set."""
    import huggingface_hub.constants

    from e2u_tasks.data import HubFile, resolve_hub_file

    snapshot = tmp_path / "datasets--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "data.json").write_text("[]")
    (tmp_path / "datasets--someone--cached" / "refs").mkdir()
    (tmp_path / "datasets--someone--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("E2U_DATA_DIR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hub_file(HubFile("someone/cached", "data.json")) == snapshot / "data.json"
    assert no_network == []


def test_remote_code_is_not_trusted_unless_asked(tiny_model_dir, monkeypatch):
    import transformers

    from e2u_models.model import E2ULM

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    E2ULM(pretrained=tiny_model_dir, method="none", device="cpu")
    assert seen and not any(seen)
