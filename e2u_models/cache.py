"""The one place caches are located, hashed, written and verified.

Every cache entry is a folder written atomically (a temporary name in the same folder, then a
rename, so an interrupted run never leaves a half-written entry) with a ``manifest.json`` that
holds the sha256 and size of each of its files. :func:`verified_entry` checks the manifest before
an entry is used, so a truncated or corrupted entry (a full disk, a bad copy, bit rot) is
reported, removed and recomputed instead of silently feeding wrong numbers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from e2u_tasks.errors import E2UError

CACHE_ENV = "E2U_CACHE_DIR"
MANIFEST = "manifest.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` argument, else ``$E2U_CACHE_DIR``, else ``~/.cache/e2u``; must be writable."""
    chosen = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "e2u"
    root = Path(chosen).expanduser()
    if root.exists() and not root.is_dir():
        raise E2UError(f"cache_dir {str(root)!r} is a file, not a folder; set cache_dir=<writable dir> "
                       f"or {CACHE_ENV}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise E2UError(f"cache_dir {str(root)!r} cannot be created ({exc.strerror}); set "
                       f"cache_dir=<writable dir> or {CACHE_ENV}") from None
    try:  # a real write: os.access says yes to root on a read-only mount
        handle, probe = tempfile.mkstemp(prefix=".write-probe.", dir=root)
        os.close(handle)
        os.unlink(probe)
    except OSError:
        raise E2UError(f"cache_dir {str(root)!r} is not writable; set cache_dir=<writable dir> "
                       f"or {CACHE_ENV}") from None
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


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1, sort_keys=True),
                                   encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success its manifest is written and it is renamed to
    ``final``; on any failure it is removed. A full disk becomes one error line."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise _cache_write_error(final, exc) from None
    try:
        yield tmp
        _write_manifest(tmp)
        if final.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cache_write_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


STALE_SECONDS = 3600


def _remove_stale_temporaries(final: Path) -> None:
    """Temporary folders of ``final`` left by a killed run (older than an hour, so a concurrent
    writer of the same entry — another data-parallel rank — is never disturbed)."""
    now = time.time()
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)


def _cache_write_error(final: Path, exc: OSError) -> E2UError:
    if exc.errno == errno.ENOSPC:
        problem = "is full (no space left on device)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        problem = "is not writable"
    else:
        problem = f"cannot be written ({exc.strerror or exc})"
    return E2UError(f"{str(final.parent)!r} {problem} while writing {final.name[:16]}; free space "
                    f"or choose another folder (for caches: cache_dir=<dir> or {CACHE_ENV}); "
                    "nothing partial was left")


def verified_entry(folder: Path, log: Callable[[str], None] = print, what: str = "cache entry") -> bool:
    """True if ``folder`` is a complete entry whose files match its manifest.

    A missing folder is a plain miss (False). A folder whose manifest is missing, unreadable or
    does not match the files is reported through ``log`` and removed, so it is recomputed.
    """
    if not folder.is_dir():
        return False
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        present = {str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name != MANIFEST}
        if present != set(listed):
            raise ValueError(f"files {sorted(present ^ set(listed))} differ from the manifest")
        for name, expected in listed.items():
            path = folder / name
            if path.stat().st_size != expected["bytes"]:
                raise ValueError(f"{name} is truncated or grown")
            if file_sha256(path) != expected["sha256"]:
                raise ValueError(f"{name} does not match its sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log(f"e2u: {what} {folder.name[:16]} is corrupted ({exc}); removing it and recomputing")
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True
