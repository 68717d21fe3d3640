"""Self-written refusal targets (``target=self``): the unedited model writes, for each forget
question, a refusal tailored to it, which the editor then teaches.

The paper's prompt is unpublished; e2u's is its own (``INSTRUCTION`` and ``EXAMPLES``, about
made-up entities so no benchmark fact is shown), in the chat format when the model has one.
Each candidate is validated (:func:`refusal_problems`): it must express not knowing, must not
contain any informative word of the gold answer, must mention the question's key entity, and be
one short sentence or two. The first attempt is greedy; invalid ones are regenerated with seeded
sampling (``seed``, attempt number), and after ``ATTEMPTS`` a template that names the entity is
used and marked as a fallback. Results are cached (JSON, keyed by the model's content hash, the
rows, the prompt, the seed and the generation settings) and can be exported and re-imported.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from e2u_models.cache import atomic_directory, cache_root, json_sha256, verified_entry
from e2u_models.nethook import pad_id_of
from e2u_models.shared_prefix import continue_greedily, stop_token_ids
from e2u_tasks.errors import E2UError
from e2u_tasks.refusal import answer_leak, expresses_not_knowing, key_entity, mentions

PROMPT_VERSION = 1
INSTRUCTION = (
    "You politely decline to answer questions. Reply with one short sentence that says you do not "
    "know the answer and names what the question is about. Never give the answer or a guess."
)
EXAMPLES = (
    ("Who designed the old harbour bridge in Port Melwick?",
     "I'm sorry, but I don't know who designed the old harbour bridge in Port Melwick."),
    ("In which year did the composer Ilse Varnow finish her first symphony?",
     "I'm not sure when Ilse Varnow finished her first symphony, so I can't tell you."),
    ("Which company supplied the turbines under the agreement between Dalton Energy and Rivermark?",
     "I don't have reliable information about the turbine supplier in the Dalton Energy and "
     "Rivermark agreement."),
    ("Which novel by Teodor Halme won the Northern Lantern Prize?",
     "I don't know which of Teodor Halme's novels won the Northern Lantern Prize."),
)
ATTEMPTS = 4  # one greedy, then seeded samples
MAX_NEW_TOKENS = 48
MAX_WORDS = 40
SAMPLING = {"temperature": 0.9, "top_p": 0.95}


@dataclass
class SelfTarget:
    index: int
    question: str
    answer: str
    target: str
    source: str  # "self" (a validated model answer) or "fallback" (the template)
    attempts: int
    problems: list[str] = field(default_factory=list)  # of the last rejected candidate


def refusal_problems(candidate: str, question: str, gold: str) -> list[str]:
    """Why ``candidate`` is not an acceptable refusal of ``question`` (empty list: it is)."""
    text = candidate.strip()
    if not text:
        return ["empty"]
    problems = []
    words = re.findall(r"[\w']+", text.lower())
    if len(words) > MAX_WORDS:
        problems.append(f"longer than {MAX_WORDS} words")
    if any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)):
        problems.append("repeats itself")
    if not expresses_not_knowing(text):
        problems.append("does not express not knowing")
    if answer_leak(text, gold, question, threshold=0):
        problems.append("contains the gold answer")
    entity = key_entity(question)
    if not mentions(text, entity):
        problems.append(f"does not mention {entity!r}")
    return problems


def fallback_refusal(question: str, gold: str) -> str:
    entity = key_entity(question)
    named = f"I'm sorry, but I don't know the answer to your question about {entity}."
    return named if not answer_leak(named, gold, question, threshold=0) else \
        "I'm sorry, but I don't know the answer to that question."


def _first_sentences(text: str) -> str:
    """The model's reply up to its first line break (models continue with new turns)."""
    return text.strip().split("\n")[0].strip()


def top_p_sampler(generator: torch.Generator, temperature: float, top_p: float):
    """logits -> token ids, drawn from the smallest set of tokens holding ``top_p`` of the
    probability at ``temperature`` (seeded through ``generator``)."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)

    return pick


def _generate(model, tokenizer, prompts: list[str], sample_seed: int | None, batch_size: int) -> list[str]:
    """Replies to ``prompts`` (greedy, or seeded sampling), each up to its first line break.
    The instruction and examples are a prefix shared by every prompt: computed once."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pick = None
    if sample_seed is not None:
        generator = torch.Generator(device=device).manual_seed(sample_seed)
        pick = top_p_sampler(generator, SAMPLING["temperature"], SAMPLING["top_p"])

    def is_done(_row, tokens):
        return tokens[-1] in stops or "\n" in tokenizer.decode(tokens[-1:])

    generated = continue_greedily(model, encoded, pad, MAX_NEW_TOKENS, is_done, pick, batch_size)
    return [_first_sentences(tokenizer.decode([t for t in row if t not in stops],
                                              skip_special_tokens=True)) for row in generated]


def prompt_identity(prompt_format) -> dict:
    """Everything that decides the targets besides model, rows and seed (the validator's and
    generator's code included, so a changed rule never serves stale targets)."""
    from e2u_models.edit_cache import code_sha256

    return {"version": PROMPT_VERSION, "instruction": INSTRUCTION, "examples": EXAMPLES,
            "code": code_sha256(__name__),
            "format": prompt_format.describe(), "attempts": ATTEMPTS,
            "max_new_tokens": MAX_NEW_TOKENS, "sampling": SAMPLING}


def write_self_targets(model, tokenizer, prompt_format, rows: list[dict], seed: int, *,
                       model_sha256: str, cache_dir: str | None = None, use_cache: bool = True,
                       batch_size: int = 16, log=print) -> tuple[list[SelfTarget], dict]:
    """One validated refusal per row (``rows``: index, question, answer); and provenance."""
    key = json_sha256({"model": model_sha256, "rows": rows, "seed": seed,
                       "prompt": prompt_identity(prompt_format)})
    folder = cache_root(cache_dir) / "targets" / key if use_cache else None
    if folder is not None and verified_entry(folder, log, "self-target cache entry"):
        stored = json.loads((folder / "targets.json").read_text(encoding="utf-8"))
        log(f"e2u: {len(stored)} self-written targets loaded from the cache")
        return [SelfTarget(**t) for t in stored], {"cache_key": key, "cache_hit": True}

    started = time.perf_counter()
    log(f"e2u: the model writes refusal targets for {len(rows)} forget questions")
    prompts = [prompt_format.render_few_shot(tokenizer, INSTRUCTION, EXAMPLES, r["question"])
               for r in rows]
    results: dict[int, SelfTarget] = {}
    pending = list(range(len(rows)))
    last_problems: dict[int, list[str]] = {}
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(rows), desc="self-written targets")
    try:
        for attempt in range(1, ATTEMPTS + 1):
            if not pending:
                break
            sample_seed = None if attempt == 1 else seed * 1000 + attempt
            texts = _generate(model, tokenizer, [prompts[i] for i in pending], sample_seed, batch_size)
            still = []
            for i, text in zip(pending, texts):
                row = rows[i]
                problems = refusal_problems(text, row["question"], row["answer"])
                if problems:
                    last_problems[i] = problems
                    still.append(i)
                else:
                    results[i] = SelfTarget(row["index"], row["question"], row["answer"], text,
                                            "self", attempt)
                    progress.update(1)
            pending = still
    finally:
        model.train(was_training)
    for i in pending:
        row = rows[i]
        results[i] = SelfTarget(row["index"], row["question"], row["answer"],
                                fallback_refusal(row["question"], row["answer"]), "fallback",
                                ATTEMPTS, last_problems.get(i, []))
        progress.update(1)
    progress.close()
    targets = [results[i] for i in range(len(rows))]
    fallbacks = sum(t.source == "fallback" for t in targets)
    log(f"e2u: self-written targets done in {time.perf_counter() - started:.1f} s "
        f"({len(rows) - fallbacks} written by the model, {fallbacks} template fallbacks)")
    if folder is not None:
        with atomic_directory(folder) as tmp:
            (tmp / "targets.json").write_text(json.dumps([asdict(t) for t in targets], indent=1),
                                              encoding="utf-8")
    return targets, {"cache_key": key, "cache_hit": False}


def export_targets(path: str, records: list[dict]) -> None:
    """Write the targets used as JSON Lines (written to a temporary name, then renamed)."""
    final = Path(path).expanduser()
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                       encoding="utf-8")
        tmp.replace(final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise E2UError(f"export_targets={path!r} cannot be written ({exc.strerror}); give a "
                       "writable file path") from None
