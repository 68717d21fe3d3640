"""``save_edited=<dir>``: the edited model written as a Hugging Face folder plus e2u's added state.

The folder holds ``save_pretrained`` output (config, safetensors weights, tokenizer, chat
template), the adapters of :mod:`e2u_models.editing.adapters` when a method added any (GRACE's codebook,
WISE's side memory) and ``e2u_edit.json`` (the method, its hparams and report). Loading it with
``pretrained=<dir>`` re-attaches the adapters, so the outputs are the edited model's; other tools
that load it as a plain HF model get the weights only (ROME/MEMIT/AlphaEdit edits are complete
there). The path is checked before any editing, and the folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from e2u_models.editing.adapters import save_adapters
from e2u_models.cache import atomic_directory
from e2u_tasks.errors import E2UError

MARKER = "e2u_edit.json"


def check_save_target(save_edited: str | None) -> Path | None:
    """The folder to write, checked now: it must not be a file or a foreign non-empty folder (an
    earlier save_edited folder is replaced), and its parent must be creatable and writable."""
    if save_edited in (None, "", "None"):
        return None
    target = Path(str(save_edited)).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise E2UError(f"save_edited={save_edited!r} is an existing file; give a folder path "
                       "(new, empty, or written earlier by save_edited)")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise E2UError(f"save_edited={save_edited!r} is a non-empty folder not written by e2u; "
                       "give a new or empty folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".e2u-write-check-"):
            pass
    except OSError as exc:
        raise E2UError(f"save_edited={save_edited!r} is not writable ({exc.strerror or exc}); "
                       "give a folder in a writable location") from None
    return target


def save_edited_model(model, tokenizer, target: Path, record: dict, log=print) -> Path:
    """Write the model, tokenizer, adapters and ``record`` into ``target`` (atomically)."""
    started = time.perf_counter()
    staging = target.with_name(target.name + ".e2u-new")
    shutil.rmtree(staging, ignore_errors=True)
    with atomic_directory(staging) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        index = save_adapters(model, tmp)
        payload = {**record, "adapters": index}
        (tmp / MARKER).write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    _readable_like_a_model_folder(target)
    log(f"e2u: edited model saved to {target} in {time.perf_counter() - started:.1f} s"
        + (f" (with {len(index['adapters'])} adapter(s))" if index else ""))
    return target


def _readable_like_a_model_folder(folder: Path) -> None:
    """The staging folder and files were created private (mkdtemp, safetensors); give them the
    permissions the user's umask gives any saved model."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
