"""Benchmark data by hub dataset id, resolved from a local mirror first.

A mirror is a directory laid out as ``<dataset id>/<file name>`` (for example
``locuslab/TOFU/real_authors_perturbed.json``), given as an argument (``data_dir``) or in the
environment variable ``E2U_DATA_DIR``. Without a mirror hit the file is fetched from the Hugging
Face hub (``huggingface_hub``, the client ``datasets`` itself uses). The data files are never
shipped with e2u; only our own additions (paraphrased questions, and ``known_facts``, a benchmark
we wrote ourselves) are package data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from e2u_tasks.errors import E2UError

DATA_DIR_ENV = "E2U_DATA_DIR"
KNOWN_FACTS_ROWS = 117


@dataclass(frozen=True)
class HubFile:
    dataset_id: str
    filename: str

    def __str__(self) -> str:
        return f"{self.dataset_id}/{self.filename}"


@dataclass(frozen=True)
class Benchmark:
    """A built-in benchmark: which hub files (or one package data file) make it, in order, and how
    it is split."""

    name: str
    files: tuple[HubFile, ...]
    expected_rows: int
    # Field naming the group a forget selection picks whole (PISTOL's contract "edge"), or None
    # for a random sample of rows.
    group_field: str | None
    default_forget_groups: tuple[str, ...] = ()
    paraphrase_file: str | None = None
    # Our own benchmark: a JSON Lines file under ``e2u_tasks/data`` (paraphrases inline), not hub files.
    package_file: str | None = None
    # The group label names the entities it connects, joined by this (PISTOL's edge ``A_C2`` is
    # a contract between entities ``A`` and ``C2``); None when groups have no entities.
    entity_separator: str | None = None

    def entities(self, row: dict) -> frozenset[str]:
        """The entities of a row's group (its contract's parties)."""
        if self.group_field is None or self.entity_separator is None:
            raise E2UError(f"benchmark {self.name!r} has no entities in its rows")
        return frozenset(str(row.get(self.group_field)).split(self.entity_separator))


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="tofu_factual",
            files=(
                HubFile("locuslab/TOFU", "real_authors_perturbed.json"),
                HubFile("locuslab/TOFU", "world_facts_perturbed.json"),
            ),
            expected_rows=217,
            group_field=None,
            paraphrase_file="tofu_factual.jsonl",
        ),
        Benchmark(
            name="pistol",
            files=(HubFile("xinchiqiu/PISTOL", "sample_data_1.json"),),
            expected_rows=400,
            group_field="edge",
            default_forget_groups=("A_B",),
            paraphrase_file="pistol_sample_data_1.jsonl",
            entity_separator="_",
        ),
        # Well-known facts the embedded model answers correctly in both phrasings: the kept rows
        # of known_facts/candidates.jsonl (benchmarks/filter_known_facts.py, record in filter.json).
        Benchmark(
            name="known_facts",
            files=(),
            expected_rows=KNOWN_FACTS_ROWS,
            group_field=None,
            package_file="known_facts/known_facts.jsonl",
        ),
    )
}


def mirror_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The mirror to try first: the argument, else ``$E2U_DATA_DIR``, else none."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise E2UError(
            f"data mirror {str(path)!r} is not a directory; set data_dir=<dir> or {DATA_DIR_ENV} "
            "to a folder laid out as <dataset id>/<file>, or unset it to use the hub"
        )
    return path


def hub_offline() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline.

    Read from the environment at each call (not from ``huggingface_hub``'s constants, which are
    frozen when that library is first imported), so setting the variable later still counts.
    """
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_hub_file(file: HubFile, data_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a hub dataset file.

    With a mirror configured the mirror is the only source (no network access is attempted, so a
    CI job never silently measures a different file than the one it pinned). Without one the
    file is downloaded from the hub, or, in offline mode, taken from the local hub cache only:
    e2u looks the cache up itself then, since ``hf_hub_download`` may still open connections
    (e.g. for its user-agent) when the library was imported before offline mode was set.
    """
    mirror = mirror_dir(data_dir)
    if mirror is not None:
        candidate = mirror / file.dataset_id / file.filename
        if candidate.is_file():
            return candidate
        raise E2UError(
            f"cannot load dataset {file.dataset_id!r} file {file.filename!r}: not in the data "
            f"mirror {str(mirror)!r} (expected {str(candidate)!r}); with a mirror set e2u does not "
            f"go to the hub: add the file there, or unset {DATA_DIR_ENV}/data_dir to download it"
        )
    offline = hub_offline()
    try:
        if offline:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(file.dataset_id, file.filename, repo_type="dataset")
            if not isinstance(cached, str):
                raise FileNotFoundError(file.filename)
            return Path(cached)
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=file.dataset_id, filename=file.filename,
                                    repo_type="dataset"))
    except Exception as exc:  # offline, unknown id, missing file: all the same to the user
        where = "offline mode and not in the local hub cache" if offline else (
            f"the hub failed ({type(exc).__name__})")
        raise E2UError(
            f"cannot load dataset {file.dataset_id!r} file {file.filename!r}: {where}; set "
            f"{DATA_DIR_ENV}=<dir> (or data_dir=<dir>) to a mirror that holds "
            f"<dir>/{file.dataset_id}/{file.filename}"
        ) from None


def read_qa_file(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON array or JSON Lines file, each with string ``question`` and ``answer``.

    TOFU's ``.json`` files are JSON Lines, PISTOL's are arrays, so the format is sniffed, not
    taken from the extension.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise E2UError(f"data file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise E2UError(f"data file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise E2UError(f"data file {str(path)!r} cannot be read: {exc.strerror}") from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise E2UError(f"data file {str(path)!r} is empty; expected a JSON array or JSON Lines of "
                       "objects with 'question' and 'answer'")
    rows: list = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise E2UError(f"data file {str(path)!r} is not valid JSON: {exc.msg} at line "
                           f"{exc.lineno}") from None
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise E2UError(f"data file {str(path)!r} line {lineno} is not valid JSON "
                               f"({exc.msg}); expected one object per line") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise E2UError(f"data file {str(path)!r} row {i} is a {type(row).__name__}, expected "
                           "an object with 'question' and 'answer'")
        for field in ("question", "answer"):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise E2UError(f"data file {str(path)!r} row {i} has no non-empty string "
                               f"{field!r}; each row needs 'question' and 'answer' (optional "
                               "'paraphrase', 'subject')")
        if "paraphrase" in row and not isinstance(row["paraphrase"], str):
            raise E2UError(f"data file {str(path)!r} row {i}: 'paraphrase' must be a string")
    return rows


def question_key(question: str) -> str:
    """Key that matches our paraphrases to the benchmark's questions without storing them."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def load_paraphrases(filename: str) -> dict[str, str]:
    """Our paraphrased questions (package data), keyed by :func:`question_key`."""
    source = resources.files("e2u_tasks").joinpath("data", "rephrase", filename)
    result: dict[str, str] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            result[entry["question_sha256"]] = entry["paraphrase"]
    return result


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """All rows of a built-in benchmark in their canonical order, with ``paraphrase`` filled in."""
    bench = BENCHMARKS[name]
    rows: list[dict] = []
    if bench.package_file:
        source = resources.files("e2u_tasks").joinpath("data", bench.package_file)
        with resources.as_file(source) as path:
            rows = [{**row, "source": f"e2u_tasks/data/{bench.package_file}"}
                    for row in read_qa_file(path)]
    for file in bench.files:
        for row in read_qa_file(resolve_hub_file(file, data_dir)):
            rows.append({**row, "source": str(file)})
    if len(rows) != bench.expected_rows:
        files = bench.package_file or ", ".join(map(str, bench.files))
        raise E2UError(f"benchmark {name!r} has {len(rows)} rows, expected {bench.expected_rows}: "
                       f"the files {files} differ from the published ones")
    if bench.paraphrase_file:
        paraphrases = load_paraphrases(bench.paraphrase_file)
        for row in rows:
            row.setdefault("paraphrase", paraphrases.get(question_key(row["question"])))
    return rows


def load_user_dataset(spec: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """A user's own QA data: a local ``.json``/``.jsonl`` path, or ``<owner>/<name>/<file>`` on
    the hub (resolved through the mirror like the built-ins)."""
    path = Path(spec).expanduser()
    if path.exists():
        return read_qa_file(path)
    if spec.startswith((".", "/", "~")):
        raise E2UError(f"dataset file {spec!r} does not exist; give an existing .json/.jsonl file "
                       "(objects with 'question' and 'answer'), a built-in benchmark "
                       f"({', '.join(sorted(BENCHMARKS))}) or a hub file id '<owner>/<name>/<file>.json[l]'")
    parts = spec.split("/")
    if len(parts) >= 3 and spec.endswith((".json", ".jsonl")):
        file = HubFile("/".join(parts[:2]), "/".join(parts[2:]))
        return read_qa_file(resolve_hub_file(file, data_dir))
    raise E2UError(
        f"dataset {spec!r} is neither a built-in benchmark ({', '.join(sorted(BENCHMARKS))}), an "
        "existing .json/.jsonl file, nor a hub file id '<owner>/<name>/<file>.json[l]'"
    )


def content_hash(rows: list[dict]) -> str:
    """Hash of the question/answer/paraphrase content, recorded with every result."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["question"], row["answer"], row.get("paraphrase")],
                                 ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()
