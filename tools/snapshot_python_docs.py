"""Write the shipped statistics prose, ``e2u_models/data/python_docs_prose.txt.gz``, from the
running interpreter's ``pydoc_data.topics``.

Why a snapshot: CPython's documentation topics differ between Python versions, so covariance
statistics read from the interpreter made ROME/MEMIT/AlphaEdit edits depend on the user's Python.
The shipped file is read instead, on every interpreter. The snapshot was written with CPython
3.11 (the text is the Python documentation, PSF License Version 2; see
``e2u_models/data/python_docs_prose.LICENSE``). Rerunning this on another Python changes the
corpus, its content hash and every edit that uses it: only do it on purpose, with a CHANGELOG entry.

    python tools/snapshot_python_docs.py [--check]
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "e2u_models" / "data" / "python_docs_prose.txt.gz"
MIN_BLOCK_CHARS = 40  # headings and one-line fragments are not prose


def prose_blocks() -> list[str]:
    from pydoc_data.topics import topics

    return [block.strip() for name in sorted(topics) for block in topics[name].split("\n\n")
            if len(block.strip()) > MIN_BLOCK_CHARS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only say whether this interpreter's topics equal the shipped snapshot")
    args = parser.parse_args()
    text = "\n\n".join(prose_blocks())
    version = ".".join(map(str, sys.version_info[:2]))
    if args.check:
        shipped = gzip.decompress(TARGET.read_bytes()).decode("utf-8")
        same = shipped == text
        print(f"python {version}: {'equal to' if same else 'differs from'} the shipped snapshot")
        return 0 if same else 1
    TARGET.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    print(f"wrote {TARGET} ({text.count(chr(10) * 2) + 1} blocks, python {version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
