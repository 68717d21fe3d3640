"""State that editing methods add to a model instead of changing its weights (GRACE's codebook,
WISE's side memory), attached with forward hooks and saved/loaded beside the model.

An adapter hooks one module and rewrites its output per token position, so it acts identically
under teacher forcing, batched and padded inputs, and incremental decoding with a key/value cache
(each position's decision depends only on that position's input). The adapters of a model live
in the plain attribute ``model.e2u_adapters`` (not registered as submodules, so ``state_dict``
and ``save_pretrained`` keep the model's own format). On disk an adapter set is
``e2u_adapters.safetensors`` (tensors named ``<n>.<name>``) plus ``e2u_adapters.json`` (kind,
hooked module, description, tensor names, sha256 of the tensors file).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from e2u_models.cache import file_sha256
from e2u_tasks.errors import E2UError

ATTRIBUTE = "e2u_adapters"
TENSORS_FILE = "e2u_adapters.safetensors"
INDEX_FILE = "e2u_adapters.json"
# kind -> "module:class" of the adapter that restores it.
KINDS = {
    "grace": "e2u_models.methods.grace:Codebook",
    "wise": "e2u_models.methods.wise:SideMemory",
}


class Adapter:
    """Base: one hooked module; subclasses implement ``rewrite``, ``tensors``, ``describe`` and
    ``restore`` (a classmethod building the adapter from ``describe()`` and ``tensors()``)."""

    kind = ""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self._handle = None

    def attach(self, model) -> None:
        module = dict(model.named_modules()).get(self.module_name)
        if module is None:
            raise E2UError(f"{self.kind} adapter: module {self.module_name!r} does not exist in this model")
        self._handle = module.register_forward_hook(lambda m, inputs, output: self.rewrite(inputs[0], output))
        adapters_of(model).append(self)

    def detach(self, model) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        adapters = adapters_of(model)
        if self in adapters:
            adapters.remove(self)

    def rewrite(self, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def restore(cls, model, description: dict, tensors: dict[str, torch.Tensor]) -> "Adapter":
        raise NotImplementedError


def adapters_of(model) -> list[Adapter]:
    adapters = model.__dict__.get(ATTRIBUTE)
    if adapters is None:
        adapters = []
        object.__setattr__(model, ATTRIBUTE, adapters)
    return adapters


def save_adapters(model, folder: Path, first: int = 0) -> dict | None:
    """Write the model's adapters (from number ``first`` on) into ``folder``; returns the index
    written (None: no adapters)."""
    from safetensors.torch import save_file

    adapters = adapters_of(model)[first:]
    if not adapters:
        return None
    tensors, entries = {}, []
    for number, adapter in enumerate(adapters):
        names = []
        for name, tensor in adapter.tensors().items():
            tensors[f"{number}.{name}"] = tensor.detach().cpu().contiguous()
            names.append(name)
        entries.append({"kind": adapter.kind, "module": adapter.module_name,
                        "description": adapter.describe(), "tensors": names})
    save_file(tensors, str(folder / TENSORS_FILE))
    index = {"adapters": entries, "tensors_sha256": file_sha256(folder / TENSORS_FILE)}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


def has_saved_adapters(folder: str | Path) -> bool:
    return (Path(folder) / INDEX_FILE).is_file()


def load_adapters(model, folder: str | Path) -> dict:
    """Attach the adapters saved in ``folder`` (checked against their hash); returns the index
    (entries and tensors hash). Raises one clear line when the files are missing or do not match."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        if file_sha256(folder / TENSORS_FILE) != index["tensors_sha256"]:
            raise ValueError("the tensors file does not match its recorded sha256")
        tensors = load_file(str(folder / TENSORS_FILE))
        entries = index["adapters"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise E2UError(f"saved e2u adapters in {str(folder)!r} cannot be loaded ({exc})") from None
    for number, entry in enumerate(entries):
        if entry.get("kind") not in KINDS:
            raise E2UError(f"saved e2u adapter kind {entry.get('kind')!r} in {str(folder)!r} is "
                           f"unknown; accepted: {', '.join(KINDS)}")
        module_path, class_name = KINDS[entry["kind"]].split(":")
        cls = getattr(importlib.import_module(module_path), class_name)
        own = {name: tensors[f"{number}.{name}"] for name in entry["tensors"]}
        cls.restore(model, {**entry["description"], "module": entry["module"]}, own).attach(model)
    return index
