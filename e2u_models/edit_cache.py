"""The edit cache: an edited model's changed weights, stored so the next run reuses the edit.

An entry is ``<cache>/edits/<key>/`` with ``weights.safetensors`` (the changed parameters' new
values, bit-exact), the methods' added state when there is any (``e2u_adapters.*``, GRACE's
codebook or WISE's side memory, see :mod:`e2u_models.editing.adapters`) and ``entry.json`` (the method report, the key's inputs and the sha256 of the
weights file). The key hashes everything the edit depends on: the model's parameters, the method,
its hyperparameters, the requests (rows, prompts, targets), the seed, and the source code of the
methods and statistics. Entries are written atomically and verified on load; a corrupted entry is
reported, removed and recomputed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from e2u_models.editing.adapters import has_saved_adapters, load_adapters, save_adapters
from e2u_models.cache import atomic_directory, cache_root, json_sha256, verified_entry
from e2u_tasks.errors import E2UError

FORMAT_VERSION = 2


# Config entries that say where and by what the model was loaded, not what it is: a content hash
# must be the same for the same weights in another folder, on another machine.
CONFIG_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")


def model_sha256(model) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes, bytes) and the config (less
    where it was loaded from)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_PROVENANCE_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in list(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # the tensor's own bytes through the buffer protocol: no copy of the model
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def source_closure(module: str, package: tuple[str, ...] = ("e2u_models", "e2u_tasks")) -> list[str]:
    """``module`` and every e2u module (of ``package``) it imports, directly or not (sorted names).
    Package ``__init__`` files are left out: they hold registries, not algorithms.

    Read from the source (``ast``), so the answer does not depend on what happens to be imported.
    """
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        try:
            spec = None if name in seen else importlib.util.find_spec(name)
        except (ImportError, ValueError):  # ``from module import Name``: Name is no module
            spec = None
        if (spec is None or not spec.origin or not spec.origin.endswith(".py")
                or spec.submodule_search_locations is not None):  # packages: registries only
            continue
        seen.add(name)
        tree = ast.parse(Path(spec.origin).read_bytes())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith(package)]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.startswith(package):
                todo.append(node.module)
                todo += [f"{node.module}.{alias.name}" for alias in node.names]
    return sorted(seen)


def code_sha256(method_module: str) -> str:
    """Hash of the code an edit depends on: the method's module and the e2u modules it uses.

    Adding or changing another method does not invalidate this method's cached edits."""
    digest = hashlib.sha256()
    for name in source_closure(method_module):
        digest.update(name.encode() + b"\0" + Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()


def edit_key(inputs: dict[str, Any]) -> str:
    from e2u_models.methods import METHODS

    code = code_sha256(METHODS[inputs["method"]])
    return json_sha256({**inputs, "format": FORMAT_VERSION, "code": code})


class EditCache:
    """Changed weights under ``<cache>/<folder>/<key>/``: ``edits`` for methods, ``finetuned``
    for the fine-tuning stage (:mod:`e2u_models.training.finetune`)."""

    def __init__(self, cache_dir: str | None = None, log=print, folder: str = "edits") -> None:
        self.root = cache_root(cache_dir) / folder
        self.log = log

    def load(self, key: str, model) -> dict | None:
        """Apply a cached edit to ``model`` and return its report, or None (miss or corrupt)."""
        from safetensors.torch import load_file

        folder = self.root / key
        if not verified_entry(folder, self.log, "edit cache entry"):
            return None
        try:
            entry = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "weights.safetensors"))
            params = dict(model.named_parameters())
            if set(tensors) - set(params):
                raise ValueError("unknown parameter names")
            report = entry["report"]
            if has_saved_adapters(folder):
                load_adapters(model, folder)
        except (OSError, ValueError, KeyError, TypeError, E2UError) as exc:
            self.log(f"e2u: edit cache entry {key[:12]} does not fit this model ({exc}); "
                     "removing it and editing again")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return report

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
            entry = {"report": report, "inputs": inputs}
            (tmp / "entry.json").write_text(json.dumps(entry, indent=1, default=str), encoding="utf-8")
        return final
