"""Method registry: name -> module implementing the protocol in :mod:`e2u_models.protocol`.

A new method is one module here, one YAML in ``hparams/``, one line below and its tests.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from e2u_tasks.errors import E2UError

# Read-only after import: name -> module path.
METHODS = {
    "none": "e2u_models.methods.none",
    "rome": "e2u_models.methods.rome",
    "memit": "e2u_models.methods.memit",
    "alphaedit": "e2u_models.methods.alphaedit",
    "ga": "e2u_models.methods.ga",
    "gd": "e2u_models.methods.gd",
    "kl": "e2u_models.methods.kl",
    "dpo": "e2u_models.methods.dpo",
    "grace": "e2u_models.methods.grace",
    "wise": "e2u_models.methods.wise",
}


def get_method(name: str) -> ModuleType:
    key = str(name).strip().lower()
    if key in METHODS:
        return importlib.import_module(METHODS[key])
    raise E2UError(f"unknown method {name!r}; available methods: {', '.join(METHODS)}")
