"""The split spec: one object, built from the same ``--model_args`` by the model (to know what to
forget) and by the tasks (to know what to evaluate), so the two can never disagree.

Forget selection:
- a benchmark without groups (``tofu_factual``, your own data): ``forget_size`` rows (default 40)
  drawn by ``forget_seed`` (default 0) with a hash ranking that is stable across Python, numpy and
  e2u releases; or an explicit ``forget_indices`` list;
- ``pistol``: every QA of the contract(s) ``forget_edge`` (default ``A_B``), or ``forget_indices``.
Retain is every other row; rephrase is the forget rows with the question paraphrased. On
``pistol`` retain is also reported in two parts (:data:`RETAIN_PARTS`): ``retain_adjacent``, the
rows of contracts that share a party with a forgotten contract, and ``retain_far``, the rest.

``attack=relearn`` with ``attack_data=forget_half`` (the default data of that attack): the forget
rows are split in two halves by a seeded hash ranking; the model relearns one half after its
method ran and the tasks evaluate the other (held-out) half as the forget and rephrase splits, so
the model args decide both sides here.

``known_only=true``: before the method runs, the unedited model answers every row and only the
rows it answers correctly (:data:`e2u_tasks.known.KNOWN_RULE`) take part: the forget rows are
drawn among them (``forget_size``/``forget_seed`` rank positions in the known rows; an edge or
``forget_indices`` keep their known rows) and retain is the other known rows. The model decides
the known rows (:func:`register_known`); the tasks of the same process read them from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from e2u_tasks.data import BENCHMARKS, content_hash, load_benchmark, load_user_dataset
from e2u_tasks.errors import E2UError

DEFAULT_DATASET = "tofu_factual"
DEFAULT_FORGET_SIZE = 40
SPLIT_NAMES = ("forget", "retain", "rephrase")
# The retain rows of a dataset whose groups connect entities (pistol), in two parts: rows of a
# group that shares an entity with a forgotten group (where forgetting ripples) and the rest.
RETAIN_PARTS = ("retain_adjacent", "retain_far")
TASK_SPLITS = SPLIT_NAMES + RETAIN_PARTS
# Model args that belong to the split spec (everything else is the model's or the method's).
SPEC_KEYS = ("dataset", "forget_size", "forget_seed", "forget_edge", "forget_indices", "known_only",
             "data_dir")
# content hash of a dataset -> the rows the most recently prepared e2u model of this process
# answers correctly (known_only=true)
_KNOWN_ROWS: dict[str, tuple[int, ...]] = {}


def parse_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An integer argument from CLI/Python/YAML spellings, or one clear error line."""
    if isinstance(value, bool):
        raise E2UError(f"{name}={value!r} is not an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise E2UError(f"{name}={value!r} is not an integer") from None
    if not isinstance(value, int):
        raise E2UError(f"{name}={value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise E2UError(f"{name}={value} is out of range: it must be >= {minimum}")
    return value


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise E2UError(f"{name}={value!r} is not accepted; use true or false")


def register_known(splits: Splits) -> None:
    """Make the model's known rows of ``splits`` the ones this process's tasks evaluate."""
    if splits.known is not None:
        _KNOWN_ROWS[splits.content_hash] = splits.known


def parse_list(name: str, value: Any) -> list:
    """A list argument: a real list, JSON ``[1,2]``, or ``a;b;c`` / ``a+b`` (the Python
    ``model_args`` string parser splits at commas, so commas cannot be used there)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise E2UError(f"{name}={value!r} is not a valid JSON list") from None
            if isinstance(parsed, list):
                return parsed
        for sep in (";", "+", " "):
            if sep in text:
                return [part for part in text.split(sep) if part]
        return [text] if text else []
    raise E2UError(f"{name}={value!r} is not a list; use [a,b], 'a;b' or 'a+b'")


def _named_dataset(args: Mapping[str, Any]) -> str | None:
    """``dataset=``, else the ``finetune=`` dataset (a model fine-tuned on a dataset is evaluated
    on it unless told otherwise), else None."""
    for key in ("dataset", "finetune"):
        value = args.get(key)
        if value not in (None, "") and str(value).strip().lower() not in ("none", "false"):
            return str(value)
    return None


def _relearns_half(args: Mapping[str, Any]) -> bool:
    """``attack=relearn`` on half of the forget rows (``attack_data`` unset or ``forget_half``);
    the attack args themselves are checked by the model (:mod:`e2u_models.attacks`)."""
    attack = str(args.get("attack") or "").strip().lower()
    data = str(args.get("attack_data") or "forget_half").strip().lower()
    return attack == "relearn" and data == "forget_half"


def _method_of(args: Mapping[str, Any]) -> str:
    method = args.get("method")
    return "none" if method in (None, "", "None") else str(method).lower()


@dataclass(frozen=True)
class SplitSpec:
    """Which dataset, and which of its rows the model forgets."""

    dataset: str = DEFAULT_DATASET
    forget_size: int | None = None
    forget_seed: int = 0
    forget_edge: tuple[str, ...] | None = None
    forget_indices: tuple[int, ...] | None = None
    known_only: bool = False
    data_dir: str | None = field(default=None, compare=False)
    # attack=relearn, attack_data=forget_half: one half of the forget rows is relearned, the
    # other is what the forget and rephrase tasks evaluate
    relearn_half: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, Any], default_dataset: str = DEFAULT_DATASET) -> SplitSpec:
        """Build and type-check the spec from model args (CLI or Python spellings)."""
        dataset = _named_dataset(args) or default_dataset
        forget_size = args.get("forget_size")
        forget_size = None if forget_size in (None, "") else parse_int("forget_size", forget_size, 1)
        forget_seed = parse_int("forget_seed", args.get("forget_seed", 0) or 0)
        edge = args.get("forget_edge")
        edges = None if edge in (None, "") else tuple(str(e) for e in parse_list("forget_edge", edge))
        indices = args.get("forget_indices")
        if indices in (None, ""):
            index_tuple = None
        else:
            index_tuple = tuple(parse_int("forget_indices", i, 0)
                                for i in parse_list("forget_indices", indices))
            if not index_tuple:
                raise E2UError("forget_indices is empty; give at least one row index")
            if len(set(index_tuple)) != len(index_tuple):
                raise E2UError("forget_indices has duplicates; give each row index once")
        if index_tuple is not None and (forget_size is not None or edges is not None):
            raise E2UError("forget_indices cannot be combined with forget_size or forget_edge; "
                           "give one way of choosing the forget rows")
        bench = BENCHMARKS.get(dataset)
        if bench is not None and bench.group_field is None and edges is not None:
            raise E2UError(f"forget_edge is for datasets with contract edges (pistol), not {dataset!r}; "
                           "use forget_size/forget_seed or forget_indices")
        if bench is not None and bench.group_field is not None and forget_size is not None:
            raise E2UError(f"{dataset} forgets whole contracts: use forget_edge=<edge> "
                           "(e.g. A_B or A_B+A_C) or forget_indices, not forget_size")
        data_dir = args.get("data_dir")
        return cls(dataset=dataset, forget_size=forget_size, forget_seed=forget_seed,
                   forget_edge=edges, forget_indices=index_tuple,
                   known_only=parse_bool("known_only", args.get("known_only", False)),
                   data_dir=None if data_dir in (None, "") else str(data_dir),
                   relearn_half=_relearns_half(args))

    @classmethod
    def for_task(cls, benchmark: str | None, args: Mapping[str, Any]) -> SplitSpec:
        """The spec a task evaluates, refusing a task that does not match what the model forgot.

        ``benchmark`` is the task's dataset, or None for the generic ``e2u_*`` tasks that evaluate
        whatever ``dataset=`` names.
        """
        named = _named_dataset(args) is not None
        if benchmark is None:
            return cls.from_args(args)
        spec = cls.from_args(args, default_dataset=benchmark)
        if named and spec.dataset != benchmark:
            raise E2UError(
                f"task evaluates {benchmark!r} but the model args say dataset={spec.dataset!r}; "
                f"run the {benchmark} tasks with dataset={benchmark} (or no dataset), or use the "
                "e2u_forget/e2u_retain/e2u_rephrase tasks for your own data"
            )
        if not named and _method_of(args) != "none" and benchmark != DEFAULT_DATASET:
            raise E2UError(
                f"the model forgets rows of {DEFAULT_DATASET!r} (no dataset= given) but this task "
                f"evaluates {benchmark!r}; add dataset={benchmark} to --model_args"
            )
        return spec

    def load(self, known: Sequence[int] | None = None, *, before_known: bool = False) -> Splits:
        """Load the rows and choose the forget set (fast: data files are small).

        With ``known_only`` the forget and retain rows are chosen among ``known`` (the rows the
        model answers correctly), else among the rows the model of this process registered.
        ``before_known``: the model args are being checked before the model has answered; the
        choice is made as if every row were known (it checks the args; the model redoes it).
        """
        bench = BENCHMARKS.get(self.dataset)
        rows = (load_benchmark(self.dataset, self.data_dir) if bench is not None
                else load_user_dataset(self.dataset, self.data_dir))
        n = len(rows)
        digest = content_hash(rows)
        if self.known_only and known is None and not before_known:
            known = _KNOWN_ROWS.get(digest)
            if known is None:
                raise E2UError(
                    f"known_only=true: the rows of {self.dataset} the model knows are decided by the "
                    "e2u model before its method runs, and no e2u model of this process has done that; "
                    "create the e2u model (with the same model args) before the tasks")
        known_set: set[int] = set()
        if known is not None:
            known = tuple(sorted(set(known)))
            known_set = set(known)
            if any(i < 0 or i >= n for i in known):
                raise E2UError(f"known rows out of range: {self.dataset} has {n} rows")
        if self.forget_indices is not None:
            bad = [i for i in self.forget_indices if i >= n]
            if bad:
                raise E2UError(f"forget_indices {bad} out of range: {self.dataset} has {n} rows "
                               f"(indices 0..{n - 1})")
            forget = tuple(sorted(self.forget_indices))
            unknown = [i for i in forget if known is not None and i not in known_set]
            if unknown:
                raise E2UError(f"known_only=true: forget_indices {unknown} are rows the model does "
                               f"not answer correctly (it knows {len(known)} of the {n} rows of "
                               f"{self.dataset}); choose among the known rows or drop known_only")
        elif bench is not None and bench.group_field is not None:
            forget = self._forget_by_group(rows, bench.group_field,
                                           self.forget_edge or bench.default_forget_groups)
            if known is not None:
                forget = tuple(i for i in forget if i in known_set)
                if not forget:
                    raise E2UError(f"known_only=true: the model answers none of the forget rows of "
                                   f"{self.dataset} correctly (it knows {len(known)} of {n} rows); "
                                   "choose another forget_edge or drop known_only")
        else:
            size = self.forget_size if self.forget_size is not None else DEFAULT_FORGET_SIZE
            if size >= n:
                raise E2UError(f"forget_size={size} is out of range: {self.dataset} has {n} rows, "
                               f"so forget_size must be 1..{n - 1} (at least one retain row)")
            if known is None:
                forget = seeded_sample(n, size, self.forget_seed)
            else:
                if size >= len(known):
                    raise E2UError(
                        f"known_only=true: the model answers only {len(known)} of the {n} rows of "
                        f"{self.dataset} correctly, too few for forget_size={size} (it needs "
                        f"forget_size + 1 known rows); lower forget_size or drop known_only")
                forget = tuple(known[j] for j in seeded_sample(len(known), size, self.forget_seed))
        if known is not None and len(known) <= len(forget):
            raise E2UError(f"known_only=true: the model answers only {len(known)} of the {n} rows "
                           f"of {self.dataset} correctly, all of them forget rows, so no retain "
                           "row is left; forget fewer rows or drop known_only")
        relearn = None
        if self.relearn_half:
            if len(forget) < 2:
                raise E2UError(f"attack=relearn with attack_data=forget_half needs at least 2 forget "
                               f"rows (it relearns one half and evaluates the other), but the forget "
                               f"set has {len(forget)}; forget more rows or use attack_data=retain")
            picks = seeded_sample(len(forget), len(forget) // 2, self.forget_seed, salt="e2u-relearn")
            relearn = tuple(forget[p] for p in picks)
        return Splits(spec=self, rows=tuple(rows), forget=forget, content_hash=digest, known=known,
                      relearn=relearn)

    def _forget_by_group(self, rows: list[dict], group_field: str, groups: tuple[str, ...]):
        known = sorted({str(r.get(group_field)) for r in rows})
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise E2UError(f"forget_edge {unknown} does not exist in {self.dataset}; known edges: "
                           f"{', '.join(known)}")
        return tuple(i for i, r in enumerate(rows) if str(r.get(group_field)) in groups)

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "forget_size": self.forget_size,
                "forget_seed": self.forget_seed,
                "forget_edge": list(self.forget_edge) if self.forget_edge else None,
                "forget_indices": list(self.forget_indices) if self.forget_indices else None,
                **({"known_only": True} if self.known_only else {}),
                **({"attack": "relearn", "attack_data": "forget_half"} if self.relearn_half else {})}


def seeded_sample(n: int, k: int, seed: int, salt: str = "e2u-forget") -> tuple[int, ...]:
    """``k`` of ``range(n)``, sorted: the ``k`` smallest sha256 ranks for this seed (``salt``
    keeps different draws, e.g. the relearned half of the forget rows, independent).

    A hash ranking rather than ``random.sample`` so the default forget set can never change with
    a Python or library upgrade, and growing ``k`` only adds rows (nested forget sets).
    """
    def rank(i: int) -> bytes:
        return hashlib.sha256(f"{salt}:{seed}:{i}".encode()).digest()

    return tuple(sorted(sorted(range(n), key=rank)[:k]))


@dataclass(frozen=True)
class Splits:
    """The loaded dataset and its forget/retain/rephrase views."""

    spec: SplitSpec
    rows: tuple[dict, ...]
    forget: tuple[int, ...]
    content_hash: str
    # known_only=true: the rows the model answers correctly, the only ones forget and retain use
    known: tuple[int, ...] | None = None
    # attack=relearn on half of the forget rows: the relearned half (the tasks evaluate the rest)
    relearn: tuple[int, ...] | None = None

    @property
    def evaluated_forget(self) -> tuple[int, ...]:
        """The forget rows the forget and rephrase tasks evaluate: all of them, or the half not
        relearned by ``attack=relearn``."""
        if self.relearn is None:
            return self.forget
        relearned = set(self.relearn)
        return tuple(i for i in self.forget if i not in relearned)

    @property
    def retain(self) -> tuple[int, ...]:
        chosen = set(self.forget)
        candidates = range(len(self.rows)) if self.known is None else self.known
        return tuple(i for i in candidates if i not in chosen)

    @property
    def fingerprint(self) -> str:
        """Identity of (data content, forget rows, known rows): what a task checks against the
        model."""
        parts = [self.content_hash, list(self.forget)]
        if self.known is not None:
            parts.append(list(self.known))
        if self.relearn is not None:
            parts.append({"relearn": list(self.relearn)})
        payload = json.dumps(parts)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def retain_parts(self) -> dict[str, tuple[int, ...]]:
        """The retain rows parted by adjacency: ``retain_adjacent`` holds the rows whose group
        shares an entity with the group of any forget row, ``retain_far`` the others."""
        bench = BENCHMARKS.get(self.spec.dataset)
        if bench is None or bench.entity_separator is None:
            with_entities = sorted(b.name for b in BENCHMARKS.values() if b.entity_separator)
            raise E2UError(f"the {'/'.join(RETAIN_PARTS)} splits need a dataset whose groups connect "
                           f"entities ({', '.join(with_entities)}), not {self.spec.dataset!r}")
        forgotten = frozenset().union(*(bench.entities(self.rows[i]) for i in self.forget))
        adjacent = tuple(i for i in self.retain if bench.entities(self.rows[i]) & forgotten)
        chosen = set(adjacent)
        return {"retain_adjacent": adjacent,
                "retain_far": tuple(i for i in self.retain if i not in chosen)}

    def docs(self, split: str) -> list[dict]:
        """The evaluation documents of one split."""
        if split not in TASK_SPLITS:
            raise E2UError(f"unknown split {split!r}; accepted: {', '.join(TASK_SPLITS)}")
        if split in RETAIN_PARTS:
            indices = self.retain_parts()[split]
        else:
            indices = self.retain if split == "retain" else self.evaluated_forget
        docs = []
        for i in indices:
            row = self.rows[i]
            question = row["question"]
            if split == "rephrase":
                question = row.get("paraphrase")
                if not question:
                    raise E2UError(f"dataset {self.spec.dataset!r} row {i} has no paraphrase; the "
                                   "rephrase split needs a 'paraphrase' field on every forget row")
            docs.append({"index": i, "question": question, "answer": row["answer"],
                         "original_question": row["question"], "split": split,
                         "split_fingerprint": self.fingerprint})
        return docs

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the results JSON."""
        known = {}
        if self.known is not None:
            from e2u_tasks.known import KNOWN_RULE

            known = {"known_rule": KNOWN_RULE, "known_rows": len(self.known),
                     "known_row_indices": list(self.known)}
        bench = BENCHMARKS.get(self.spec.dataset)
        parts = ({f"{name}_rows": len(rows) for name, rows in self.retain_parts().items()}
                 if bench is not None and bench.entity_separator else {})
        relearn = {} if self.relearn is None else {
            "relearn_row_indices": list(self.relearn),
            "evaluated_forget_row_indices": list(self.evaluated_forget)}
        return {**self.spec.as_dict(), **known, **relearn, "rows": len(self.rows),
                "forget_rows": len(self.forget), "retain_rows": len(self.retain), **parts,
                "forget_row_indices": list(self.forget), "data_sha256": self.content_hash,
                "split_fingerprint": self.fingerprint}
