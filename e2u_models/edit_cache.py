"""The edit cache: an edited model's changed weights, stored so the next run reuses the edit.

An entry is ``<cache>/edits/<key>/`` with ``weights.safetensors`` (the changed parameters' new
values, bit-exact), the methods' added state when there is any (``e2u_adapters.*``, GRACE's
codebook or WISE's side memory, see :mod:`e2u_models.adapters`) and ``entry.json`` (the method report, the key's inputs and the sha256 of the
weights file). The key hashes everything the edit depends on: the model's parameters, the method,
its hyperparameters, the requests (rows, prompts, targets), the seed, and the source code of the
methods and statistics. Entries are written atomically and verified on load; a corrupted entry is
reported, removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from e2u_models.adapters import has_saved_adapters, load_adapters, save_adapters
from e2u_models.cache import atomic_directory, cache_root, file_sha256, json_sha256
from e2u_tasks.errors import E2UError

FORMAT_VERSION = 1


def model_sha256(model) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, bytes) and the config."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in list(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_sha256() -> str:
    """Hash of the code an edit depends on (the methods package and the statistics)."""
    digest = hashlib.sha256()
    root = resources.files("e2u_models")
    files = sorted(p.name for p in root.joinpath("methods").iterdir() if p.name.endswith(".py"))
    for name in files:
        digest.update(root.joinpath("methods", name).read_bytes())
    digest.update(root.joinpath("stats.py").read_bytes())
    return digest.hexdigest()


def edit_key(inputs: dict[str, Any]) -> str:
    return json_sha256({**inputs, "format": FORMAT_VERSION, "code": code_sha256()})


class EditCache:
    def __init__(self, cache_dir: str | None = None, log=print) -> None:
        self.root = cache_root(cache_dir) / "edits"
        self.log = log

    def load(self, key: str, model) -> dict | None:
        """Apply a cached edit to ``model`` and return its report, or None (miss or corrupt)."""
        from safetensors.torch import load_file

        folder = self.root / key
        entry_file, weights_file = folder / "entry.json", folder / "weights.safetensors"
        if not folder.is_dir():
            return None
        try:
            entry = json.loads(entry_file.read_text(encoding="utf-8"))
            if file_sha256(weights_file) != entry["weights_sha256"]:
                raise ValueError("weights hash mismatch")
            tensors = load_file(str(weights_file))
            params = dict(model.named_parameters())
            if set(tensors) - set(params):
                raise ValueError("unknown parameter names")
            if has_saved_adapters(folder):
                load_adapters(model, folder)
        except (OSError, ValueError, KeyError, TypeError, E2UError) as exc:
            self.log(f"e2u: edit cache entry {key[:12]} is corrupted ({exc}); removing it and editing again")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return entry["report"]

    def save(self, key: str, model, names: list[str], report: dict, inputs: dict,
             first_adapter: int = 0) -> Path:
        """Store the edit: parameters ``names`` and the adapters from number ``first_adapter`` on
        (those this edit added; earlier ones came with the loaded model)."""
        from safetensors.torch import save_file

        params = dict(model.named_parameters())
        tensors = {name: params[name].detach().cpu().contiguous() for name in names}
        final = self.root / key
        with atomic_directory(final) as tmp:
            save_file(tensors, str(tmp / "weights.safetensors"))
            save_adapters(model, tmp, first=first_adapter)
            entry = {"report": report, "inputs": inputs,
                     "weights_sha256": file_sha256(tmp / "weights.safetensors")}
            (tmp / "entry.json").write_text(json.dumps(entry, indent=1, default=str), encoding="utf-8")
        return final
