"""Second-moment statistics of module inputs, for the locate-and-edit methods.

C = (1/N) Σ k kᵀ over every non-padding token of a text corpus, k the input of a linear module
(for llama-style MLPs the input of ``down_proj``): the *uncentred* second moment MEMIT and
AlphaEdit protect. The corpus rows run in batches of similar length (little padding); each
forward collects every requested module and stops after the deepest one. Each batch's Σ k kᵀ is
computed on and above the diagonal only (it is symmetric), for a float32 result as float32
products added up in float64; a float64 result is float64 throughout. Each module's result is
cached as safetensors under a key that hashes everything it depends on: the weights that feed
that module (input embeddings and every layer up to the module's), the module name, the corpus
identity and content, the token budget, the sequence cap and the storage dtype. A cached second
request reads the files and runs nothing.

Kept apart from the methods on purpose (as in the original ROME code): a method asks for
statistics (:func:`statistics_for` with a :class:`StatsSpec`), it never computes them itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from e2u_models.cache import atomic_directory, cache_root, json_sha256, verified_entry
from e2u_models.editing.keys import read_at_keys
from e2u_models.editing.requests import question_key_rows
from e2u_models.nethook import StopForward, forward_until_stopped, pad_id_of, pad_right, trace
from e2u_models.protocol import MethodEnv
from e2u_tasks.errors import E2UError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class TextCorpus:
    """Texts to collect statistics on: a stable identity, a hash of their content, and a
    generator of the texts (called once per collection)."""

    identity: str
    content_sha256: str
    texts: Callable[[], Iterable[str]]

    @classmethod
    def from_texts(cls, identity: str, texts: list[str]) -> TextCorpus:
        digest = hashlib.sha256("\n\x00".join(texts).encode("utf-8")).hexdigest()
        return cls(identity, digest, lambda: iter(texts))

    @classmethod
    def from_path(cls, path: str | Path) -> TextCorpus:
        """A text file (one document per blank-line-separated block) or a folder of ``.txt``."""
        path = Path(path).expanduser()
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise E2UError(f"stats corpus {str(path)!r} is not a text file or a folder of .txt files")
        documents = []
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise E2UError(f"stats corpus file {str(file)!r} is not UTF-8 text") from None
            documents.extend(block.strip() for block in text.split("\n\n") if block.strip())
        if not documents:
            raise E2UError(f"stats corpus {str(path)!r} holds no text")
        return cls.from_texts(f"path:{path.name}", documents)


BUILTIN_CORPUS = "python-docs"
DEFAULT_CORPUS = "e2u"
PYTHON_DOCS_FILE = "python_docs_prose.txt.gz"
PYTHON_DOCS_SNAPSHOT = "snapshot-python3.11"  # written by tools/snapshot_python_docs.py


def python_docs_corpus() -> TextCorpus:
    """The offline prose: blocks of Python's documentation topics, shipped with e2u as a fixed
    snapshot (``e2u_models/data/python_docs_prose.txt.gz``, about the default token budget) so
    statistics can always be collected without a network and do not depend on the user's
    interpreter (CPython's own ``pydoc_data`` differs between versions). It is technical English,
    narrower than Wikipedia: edits protect the directions common in such text; the identity and
    content hash recorded with every result say which corpus was used."""
    import gzip
    from importlib import resources

    packed = resources.files("e2u_models").joinpath("data", PYTHON_DOCS_FILE).read_bytes()
    documents = gzip.decompress(packed).decode("utf-8").split("\n\n")
    return TextCorpus.from_texts(f"{BUILTIN_CORPUS}:{PYTHON_DOCS_SNAPSHOT}", documents)


def hub_text_corpus(spec: str) -> TextCorpus:
    """``<dataset id>[:<config>]`` read with ``datasets`` (train split, ``text`` column)."""
    dataset_id, _, config = spec.partition(":")
    try:
        import datasets

        data = datasets.load_dataset(dataset_id, config or None, split="train")
    except Exception as exc:  # network, unknown id, missing config: one line either way
        raise E2UError(f"stats_corpus={spec!r} could not be loaded ({type(exc).__name__}); give "
                       f"a local text file or folder, or stats_corpus={BUILTIN_CORPUS}") from None
    if "text" not in data.column_names:
        raise E2UError(f"stats_corpus={spec!r} has no 'text' column (columns: {data.column_names})")
    texts = [t for t in data["text"] if t and t.strip()]
    return TextCorpus.from_texts(f"hub:{spec}", texts)


def e2u_corpus(render: Callable[[str], str]) -> TextCorpus:
    """The default: e2u's 600 generic questions (package data, no benchmark topics: no authors,
    books, geography, history, companies or named people), each rendered in the evaluated prompt
    format (chat template included), followed by the Python documentation prose. Edits are made
    at positions inside such prompts; statistics that contain the prompt format let MEMIT and
    AlphaEdit protect what all questions share and edit only what is specific to a forget
    question. Fully offline; the rendered text is part of the content hash."""
    from importlib import resources

    questions = [line.strip() for line in resources.files("e2u_models").joinpath(
        "data", "generic_questions.txt").read_text("utf-8").splitlines() if line.strip()]
    docs = python_docs_corpus()
    rendered = [render(q) for q in questions]
    return TextCorpus.from_texts(f"{DEFAULT_CORPUS}:generic-questions+{docs.identity}",
                                 rendered + list(docs.texts()))


def corpus_kind(spec: str) -> str:
    """What ``stats_corpus`` names — ``e2u``, ``python-docs``, ``path`` or ``hub`` — checked
    cheaply (a local path must exist), so a typo fails before the model loads."""
    text = str(spec).strip()
    if text in (DEFAULT_CORPUS, BUILTIN_CORPUS):
        return text
    path = Path(text).expanduser()
    if path.exists():
        return "path"
    if text.startswith((".", "/", "~")):
        raise E2UError(f"stats_corpus={spec!r} does not exist; give an existing text file or folder "
                       f"of .txt files, {DEFAULT_CORPUS} or {BUILTIN_CORPUS}")
    if "/" in text:
        return "hub"
    raise E2UError(f"stats_corpus={spec!r} is not accepted; use {DEFAULT_CORPUS}, {BUILTIN_CORPUS}, a text file or "
                   "folder, or a hub dataset id like Salesforce/wikitext:wikitext-103-raw-v1")


def resolve_corpus(spec: str, render: Callable[[str], str] | None = None) -> TextCorpus:
    """``e2u`` (offline default, needs the prompt renderer), ``python-docs``, a local text file or
    folder of ``.txt``, or a hub dataset id such as ``Salesforce/wikitext:wikitext-103-raw-v1``
    (when the hub is reachable)."""
    text = str(spec).strip()
    kind = corpus_kind(text)
    if kind == DEFAULT_CORPUS:
        if render is None:
            raise E2UError("stats_corpus=e2u needs the prompt format; give stats_corpus=python-docs")
        return e2u_corpus(render)
    if kind == BUILTIN_CORPUS:
        return python_docs_corpus()
    if kind == "path":
        return TextCorpus.from_path(Path(text).expanduser())
    return hub_text_corpus(text)


@dataclass(frozen=True)
class StatsRequest:
    modules: tuple[str, ...]
    n_tokens: int = 100_000
    max_length: int = 512
    batch_size: int = 8
    dtype: str = "float32"

    def __post_init__(self):
        if self.n_tokens < 1 or self.max_length < 2 or self.batch_size < 1:
            raise E2UError("stats: n_tokens, max_length and batch_size must be positive "
                           f"(got {self.n_tokens}, {self.max_length}, {self.batch_size})")
        if self.dtype not in ("float32", "float64"):
            raise E2UError(f"stats dtype={self.dtype!r} is not accepted; use float32 or float64")


def _layer_of(name: str) -> int | None:
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def feeding_weights_sha256(model, module_names: Iterable[str]) -> dict[str, str]:
    """Per module, a hash of the parameters that determine its input: the input embeddings and
    every parameter of the layers up to and including the module's layer (and the config).
    One pass over the weights, layer by layer, whatever the number of modules."""
    wanted = {name: _layer_of(name) for name in module_names}
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    by_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
    first: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters():
        index = _layer_of(name)
        if id(param) in embeddings:
            first.append((name, param))
        elif index is not None:
            by_layer.setdefault(index, []).append((name, param))
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())

    def feed(items):
        for name, param in items:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    feed(first)
    hashes: dict[str, str] = {}
    deepest = max((i for i in wanted.values() if i is not None), default=-1)
    for index in sorted(by_layer):
        if index > deepest:
            break
        feed(by_layer[index])
        for name, layer in wanted.items():
            if layer == index:
                hashes[name] = digest.copy().hexdigest()
    for name, layer in wanted.items():  # a module outside numbered layers: hash everything fed
        hashes.setdefault(name, digest.copy().hexdigest())
    return hashes


def _cache_keys(model, corpus: TextCorpus, request: StatsRequest,
                weights: dict[str, str] | None = None) -> dict[str, str]:
    weights = weights or feeding_weights_sha256(model, request.modules)
    return {module: json_sha256({
        "weights": weights[module], "module": module,
        "corpus": [corpus.identity, corpus.content_sha256], "n_tokens": request.n_tokens,
        # version 2: length-grouped batches, whose padding moves the moments' last float32 bits
        "max_length": request.max_length, "dtype": request.dtype, "version": 2})
        for module in request.modules}


def load_cached_moments(cache_dir: str | None, keys: dict[str, str], log=print) -> dict[str, torch.Tensor]:
    """The second moments already in the statistics cache, by module (``keys``: module -> key)."""
    from safetensors.torch import load_file

    root = cache_root(cache_dir) / "stats"
    return {module: load_file(str(root / key / "second_moment.safetensors"))["second_moment"]
            for module, key in keys.items() if verified_entry(root / key, log, "statistics cache entry")}


def store_moment(cache_dir: str | None, key: str, moment: torch.Tensor, metadata: dict[str, str]) -> torch.Tensor:
    """Write one second moment to the statistics cache (atomically); returns it on the CPU."""
    from safetensors.torch import save_file

    moment = moment.contiguous().cpu()
    with atomic_directory(cache_root(cache_dir) / "stats" / key) as tmp:
        save_file({"second_moment": moment}, str(tmp / "second_moment.safetensors"), metadata=metadata)
    return moment


def second_moments(model, tokenizer, corpus: TextCorpus, request: StatsRequest,
                   cache_dir: str | None = None, log=print,
                   weights_sha256: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """E[k kᵀ] of each requested module's input, from the cache or from one corpus pass
    (``weights_sha256``: :func:`feeding_weights_sha256` when the caller already has it)."""
    named = dict(model.named_modules())
    missing = [m for m in request.modules if m not in named]
    if missing:
        raise E2UError(f"module {missing[0]!r} does not exist in this model; set the method's "
                       "module hparam (e.g. rewrite_module_tmp) to a linear module of this "
                       "architecture, such as model.layers.{}.mlp.down_proj")
    keys = _cache_keys(model, corpus, request, weights_sha256)
    result = load_cached_moments(cache_dir, keys, log)
    todo = [m for m in request.modules if m not in result]
    if not todo:
        return result

    started = time.perf_counter()
    log(f"e2u: collecting second moments of {len(todo)} module(s) on {request.n_tokens} tokens "
        f"of {corpus.identity}")
    sums, seen = _outer_product_sums(model, tokenizer, corpus, request, todo, list(named))
    if seen == 0:
        raise E2UError(f"stats corpus {corpus.identity} produced no tokens")
    if seen < request.n_tokens:
        log(f"e2u: the corpus {corpus.identity} has only {seen} of the {request.n_tokens} tokens asked for")
    storage = getattr(torch, request.dtype)
    for module in todo:
        result[module] = store_moment(cache_dir, keys[module], (sums[module] / seen).to(storage), {
            "module": module, "tokens": str(seen), "corpus": corpus.identity,
            "corpus_sha256": corpus.content_sha256})
    seconds = time.perf_counter() - started
    log(f"e2u: second moments done in {seconds:.1f} s ({seen / seconds:.0f} tokens/s)")
    return result


def corpus_rows(tokenizer, corpus: TextCorpus, request: StatsRequest) -> list[list[int]]:
    """The token rows the statistics read: each text's first ``max_length`` tokens, in corpus
    order, until ``n_tokens`` tokens are taken (the last row cut to the budget)."""
    rows, seen = [], 0
    for text in corpus.texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: request.max_length]
        ids = ids[: request.n_tokens - seen]
        if not ids:
            continue
        rows.append(ids)
        seen += len(ids)
        if seen >= request.n_tokens:
            break
    return rows


def length_batches(rows: Sequence[Sequence[int]], token_budget: int) -> list[list[int]]:
    """Indices of ``rows`` in batches of similar length, longest first, each batch padded to its
    longest row holding at most ``token_budget`` tokens (at least one row): a second moment is a
    sum over tokens, so the grouping changes no term, and little of each forward is padding."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * len(rows[batches[-1][0]]) <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def stats_forward_batches(model, tokenizer, rows: Sequence[Sequence[int]], request: StatsRequest):
    """Yield (real-token mask, forward kwargs) of the length-grouped batches of ``rows``; a batch
    holds up to ``batch_size`` × ``max_length`` tokens."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    for batch in length_batches(rows, request.batch_size * request.max_length):
        ids, mask = pad_right([rows[i] for i in batch], pad_id, device)
        yield mask.bool(), {"input_ids": ids, "attention_mask": mask}


GRAM_BLOCK = 384  # columns per block row of the symmetric product: about 5/8 of a full product's work


def add_upper_gram(total: torch.Tensor, rows: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """Add rowsᵀ rows to ``total`` (float64) on and above the diagonal, by blocks of columns (the
    product is symmetric: the blocks below the diagonal are not computed); :func:`mirrored_upper`
    completes it. Each block is computed in ``rows``' dtype."""
    width = rows.shape[1]
    for start in range(0, width, block):
        stop = min(start + block, width)
        total[start:stop, start:] += (rows[:, start:stop].T @ rows[:, start:]).to(torch.float64)


def mirrored_upper(total: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``total``'s."""
    return total.triu() + total.triu(1).T


def _outer_product_sums(model, tokenizer, corpus: TextCorpus, request: StatsRequest, todo: list[str],
                        order: list[str]) -> tuple[dict, int]:
    """(Σ k kᵀ per module in float64, tokens read) over the corpus's first
    ``n_tokens`` tokens; each forward stops after the deepest module (``order``: all names)."""
    sums = {m: None for m in todo}
    current_mask: dict[str, torch.Tensor] = {}
    deepest = max(todo, key=lambda m: (_layer_of(m) or 0, order.index(m)))
    # A float32 result keeps about 7 digits, as does a float32 product of one batch (a block of
    # up to batch_size × max_length tokens); the blocks add up in float64. A float64 result is
    # float64 throughout.
    block_dtype = torch.float64 if request.dtype == "float64" else torch.float32

    def probe_for(name):
        def probe(inputs):
            keys_ = inputs.detach()
            # On the module's own device (a model sharded over several GPUs).
            rows = keys_[current_mask["mask"].to(keys_.device)].to(block_dtype)
            if sums[name] is None:
                width = rows.shape[1]
                sums[name] = torch.zeros((width, width), dtype=torch.float64, device=rows.device)
            add_upper_gram(sums[name], rows)
            if name == deepest:
                raise StopForward

        return probe

    rows = corpus_rows(tokenizer, corpus, request)
    seen = sum(map(len, rows))
    progress = tqdm(total=seen, unit="tok", desc="second moments")
    was_training = model.training
    model.eval()
    try:
        with trace(model, inputs={m: probe_for(m) for m in todo}), torch.no_grad():
            for mask, batch in stats_forward_batches(model, tokenizer, rows, request):
                current_mask["mask"] = mask
                forward_until_stopped(model, **batch)
                progress.update(int(mask.sum()))
    finally:
        model.train(was_training)
        progress.close()
    return {name: mirrored_upper(total) for name, total in sums.items()}, seen


@dataclass(frozen=True)
class StatsSpec:
    """What an edit asks of the statistics: the edited module (``module_tmp``, {} = the layer),
    the corpus and its size, and the preserved questions' keys to add (at ``fact_token``)."""

    module_tmp: str
    stats_corpus: str = DEFAULT_CORPUS
    mom2_n_tokens: int = 100_000
    mom2_max_length: int = 512
    mom2_dtype: str = "float32"
    preserve_questions: str | None = None
    preserve_weight: float = 10.0
    fact_token: str = "question_last"

    @classmethod
    def of(cls, hparams) -> StatsSpec:
        """The statistics settings of a locate-then-edit method's hparams."""
        return cls(hparams.rewrite_module_tmp, hparams.stats_corpus, hparams.mom2_n_tokens,
                   hparams.mom2_max_length, hparams.mom2_dtype, hparams.preserve_questions,
                   hparams.preserve_weight, hparams.fact_token)


def statistics_for(model, tokenizer, spec: StatsSpec, layers: Sequence[int], env: MethodEnv):
    """Second moments of the edited module's input at each edit layer (plus the preserved
    questions' key moment when ``preserve_questions`` is set), with their provenance."""
    corpus = resolve_corpus(spec.stats_corpus, env.render)
    modules = tuple(spec.module_tmp.format(layer) for layer in layers)
    request = StatsRequest(modules=modules, n_tokens=spec.mom2_n_tokens,
                           max_length=spec.mom2_max_length, dtype=spec.mom2_dtype)
    weights = feeding_weights_sha256(model, modules)  # hashed once for both caches
    moments = second_moments(model, tokenizer, corpus, request, env.cache_dir, log=env.log,
                             weights_sha256=weights)
    provenance = {"corpus": corpus.identity, "corpus_sha256": corpus.content_sha256,
                  "n_tokens": spec.mom2_n_tokens, "max_length": spec.mom2_max_length,
                  "dtype": spec.mom2_dtype}
    if spec.preserve_questions is not None:
        preserved, provenance["preserved"] = preserved_key_moments(model, tokenizer, spec, modules,
                                                                   env, weights)
        moments = {m: moments[m] + spec.preserve_weight * preserved[m].to(moments[m].dtype)
                   for m in modules}
    return {layer: moments[module] for layer, module in zip(layers, modules)}, provenance


def preserved_key_moments(model, tokenizer, spec: StatsSpec, modules: Sequence[str],
                          env: MethodEnv, weights: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """E[k kᵀ] of each module's input at the key token of the preserved questions (those off the
    evaluated dataset), cached in the statistics cache by a hash of the feeding weights, the
    module and the key rows (token ids and key positions); ``weights``: the feeding weights' hashes."""
    from e2u_models.question_sets import load_questions, off_dataset

    offered = load_questions(spec.preserve_questions)
    questions = off_dataset(offered, env.dataset_rows)
    if not questions:
        raise E2UError(f"preserve_questions={spec.preserve_questions!r}: every question is about an "
                       "entity of the evaluated dataset; give other questions")
    rows = question_key_rows(tokenizer, questions, spec.fact_token, env)
    rows_sha = json_sha256([[list(r.ids), r.key] for r in rows])
    keys = {m: json_sha256({"kind": "key-moment", "weights": weights[m], "module": m, "rows": rows_sha,
                            "version": 1}) for m in modules}
    moments = load_cached_moments(env.cache_dir, keys, env.log)
    todo = [m for m in modules if m not in moments]
    if todo:
        started = time.perf_counter()
        read = read_at_keys(model, tokenizer, rows, {m: "input" for m in todo})
        for m in todo:
            k = read[m].double()
            moments[m] = store_moment(env.cache_dir, keys[m], (k.T @ k / len(rows)).float(),
                                      {"module": m, "rows": str(len(rows)), "rows_sha256": rows_sha})
        env.log(f"e2u: keys of {len(rows)} preserved questions read in {time.perf_counter() - started:.1f} s")
    info = {"questions": spec.preserve_questions, "offered": len(offered), "kept": len(questions),
            "rows_sha256": rows_sha, "weight": spec.preserve_weight, "fact_token": spec.fact_token}
    return moments, info
