"""The editors through the ``e2u`` model: presets, the edit cache, provenance, bad input."""

import json
from pathlib import Path

import torch

from e2u_models.model import E2ULM

FAST = {"forget_size": 3, "v_num_grad_steps": 3, "mom2_n_tokens": 2000, "mom2_max_length": 64,
        "layers": "[0]", "device": "cpu", "batch_size": 4}


def edited(tiny_model_dir, cache_dir, **args):
    return E2ULM(pretrained=tiny_model_dir, method=args.pop("method", "memit"),
                 cache_dir=str(cache_dir), **{**FAST, **args})


def weights_of(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_second_run_reuses_the_edit_and_matches_bit_for_bit(tiny_model_dir, tmp_path):
    first = edited(tiny_model_dir, tmp_path)
    assert first.method_report.details["edit_cache"]["hit"] is False
    entries = list((tmp_path / "edits").iterdir())
    assert len(entries) == 1 and (entries[0] / "weights.safetensors").is_file()
    second = edited(tiny_model_dir, tmp_path)
    assert second.method_report.details["edit_cache"]["hit"] is True
    a, b = weights_of(first), weights_of(second)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # The report (verification included) travels with the cached edit, and so does the machine
    # that computed it.
    assert second.method_report.details["verification"] == first.method_report.details["verification"]
    computed_on = second.method_report.details["edit_cache"]["computed_on"]
    assert computed_on == first.get_model_info()["e2u"]["fingerprint"]
    assert computed_on["device_type"] == "cpu" and computed_on["threads"] == torch.get_num_threads()


def test_cache_false_edits_again_and_writes_nothing(tiny_model_dir, tmp_path):
    lm = edited(tiny_model_dir, tmp_path, cache="false")
    assert "edit_cache" not in lm.method_report.details
    assert not (tmp_path / "edits").exists()


def test_corrupted_edit_cache_entry_is_detected_and_recomputed(tiny_model_dir, tmp_path):
    first = edited(tiny_model_dir, tmp_path, method="rome")
    (entry,) = (tmp_path / "edits").iterdir()
    weights = entry / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\x00" * 16)
    again = edited(tiny_model_dir, tmp_path, method="rome")
    assert again.method_report.details["edit_cache"]["hit"] is False
    a, b = weights_of(first), weights_of(again)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_different_seed_or_hparams_is_a_different_edit(tiny_model_dir, tmp_path):
    keys = {edited(tiny_model_dir, tmp_path, **extra).method_report.details["edit_cache"]["key"]
            for extra in ({}, {"seed": 1}, {"v_lr": 0.1})}
    assert len(keys) == 3


def test_results_record_the_edit(tiny_model_dir, tmp_path):
    lm = edited(tiny_model_dir, tmp_path, method="alphaedit", merge=2)
    info = lm.get_model_info()["e2u"]
    assert info["method"] == "alphaedit" and info["hparams"]["merge"] == 2
    details = info["method_report"]["details"]
    assert details["requests"] == 2  # 3 forget rows merged in pairs
    assert details["statistics"]["corpus"].startswith("e2u:generic-questions+python-docs")
    assert set(details["null_space_dimensions"]) == {"0"}
    assert {r["index"] for r in details["verification"]["requests"]} <= set(lm.splits.forget)
    reached = sum(r["reached"] for r in details["verification"]["requests"])
    v_star = sum(loss <= details["verification"]["verify_nll"] for loss in details["v_star"]["final_losses"])
    assert info["run_card"]["targets"] == {"reached": reached, "requests": 2, "v_star_reached": v_star}
    assert info["hparams_source"].endswith("alphaedit.yaml")
    json.dumps(info)


def test_presets_are_chosen_by_config_not_name():
    from e2u_models.hparams import resolve_hparams_path

    smol = type("Config", (), {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576})()
    llama3 = type("Config", (), {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
                                 "vocab_size": 128256})()
    mistral = type("Config", (), {"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096})()
    other = type("Config", (), {"model_type": "llama", "num_hidden_layers": 12, "hidden_size": 768})()
    for method in ("rome", "memit", "alphaedit"):
        assert Path(resolve_hparams_path(method, None, smol)).stem == "smollm2-135m"
        assert Path(resolve_hparams_path(method, None, llama3)).stem == "llama3.1-8b-instruct"
        assert Path(resolve_hparams_path(method, None, mistral)).stem == "mistral-7b-instruct"
        assert resolve_hparams_path(method, None, other) is None
        assert Path(resolve_hparams_path(method, "llama2-7b-chat")).stem == "llama2-7b-chat"


def test_model_hash_is_the_content_not_the_folder(tiny_model_dir, tmp_path):
    """The same weights loaded from another folder (another machine's cache) hash the same; a
    changed weight does not."""
    import shutil

    from transformers import AutoModelForCausalLM

    from e2u_models.edit_cache import model_sha256

    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    here, there = (AutoModelForCausalLM.from_pretrained(str(d)) for d in (tiny_model_dir, copy))
    assert here.config._name_or_path != there.config._name_or_path
    assert model_sha256(here) == model_sha256(there)
    with torch.no_grad():
        next(there.parameters()).view(-1)[0] += 1.0
    assert model_sha256(here) != model_sha256(there)


def test_model_hash_reads_the_tensor_bytes_in_place(tiny_model_dir):
    """The hash is sha256 over the config (less provenance keys) then name, dtype, shape and raw
    bytes of every state entry, whatever the dtype: the digest from a byte copy of each tensor
    equals the in-place one."""
    import hashlib
    import json

    from transformers import AutoModelForCausalLM

    from e2u_models.edit_cache import CONFIG_PROVENANCE_KEYS, model_sha256

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.register_buffer("scalar_probe", torch.tensor(3.5, dtype=torch.bfloat16))
    model.model.layers[0].mlp.down_proj.to(torch.bfloat16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_PROVENANCE_KEYS}
    copied = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        copied.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        copied.update(bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist()))
    assert model_sha256(model) == copied.hexdigest()
