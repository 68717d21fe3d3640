"""The one place caches are located, hashed and written (atomically: a temporary name in the same
folder, then a rename, so an interrupted run never leaves a half-written entry)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from e2u_tasks.errors import E2UError

CACHE_ENV = "E2U_CACHE_DIR"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` argument, else ``$E2U_CACHE_DIR``, else ``~/.cache/e2u``; must be writable."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "e2u"
    root = Path(chosen).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise E2UError(f"cache_dir {str(root)!r} cannot be created ({exc.strerror}); set "
                       f"cache_dir=<writable dir> or {CACHE_ENV}") from None
    if not os.access(root, os.W_OK):
        raise E2UError(f"cache_dir {str(root)!r} is not writable; set cache_dir=<writable dir> "
                       f"or {CACHE_ENV}")
    return root


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value) -> str:
    """Hash of a JSON-serialisable value, independent of dict order."""
    payload = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it is renamed to ``final``, on failure removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
