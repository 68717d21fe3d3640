"""GRACE on tiny random llamas: the codebook rules, edits acting in free-running generation (plain
``generate`` and e2u's shared-prefix decoding), the edit cache, save_edited and reloading, bad input."""

import pytest
import torch
from lm_eval.api.instance import Instance

from e2u_models.editing.adapters import adapters_of
from e2u_models.methods import get_method, grace
from e2u_models.protocol import EditRequest
from e2u_models.hparams import load_hparams
from e2u_models.model import E2ULM
from e2u_models.nethook import pad_id_of
from e2u_tasks.errors import E2UError
from tests.conftest import build_tiny_model

EDITED = ["Who wrote the play about two young lovers?", "What is the capital of France?"]
UNRELATED = ["Which author is known for the novel about a farm?",
             "What was the effective date of the contract?"]
FAST = {"forget_size": 3, "n_iter": 4, "layer": 1, "device": "cpu", "batch_size": 4}


def generate(model, tokenizer, env, questions, use_cache=True, new_tokens=6):
    """Greedy continuations of the chat-templated questions, one batch, left padding."""
    tokenizer.padding_side = "left"
    batch = tokenizer([env.render(q) for q in questions], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:]) for row in out]


def test_generation_time_edit_yields_the_refusal(tokenizer, env, one_thread):
    """The reference's users report GRACE edits that do not apply when generating: ours do, under
    greedy chat-template generation with a KV cache and left padding, and leave other prompts be."""
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    before_edited = generate(model, tokenizer, env, EDITED)
    before_other = generate(model, tokenizer, env, UNRELATED)
    # A random 4-layer model cannot carry a long sentence from one position, so the refusal here
    # is its first token ("I" of "I don't know"); SmolLM2 runs show whole refusals (README).
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I")
                for i, q in enumerate(EDITED)]
    hparams = load_hparams(grace.HyperParams, "grace", None,
                           {"layer": 1, "n_iter": 40, "edit_lr": 5.0, "target_eos": False})
    report = grace.apply(model, tokenizer, requests, None, hparams, seed=0, env=env)
    assert report.details["codebook"]["entries"] == 2
    assert all(r["nll_after"] < r["nll_before"] for r in report.details["verification"]["requests"])
    after_edited = generate(model, tokenizer, env, EDITED)
    assert all(text.startswith("I") for text in after_edited)
    assert not any(text.startswith("I") for text in before_edited)
    # Unrelated prompts (outside every radius) generate exactly as before.
    assert generate(model, tokenizer, env, UNRELATED) == before_other
    # With and without the KV cache, batched with unrelated rows: the same continuations.
    mixed = EDITED + UNRELATED
    assert generate(model, tokenizer, env, mixed, use_cache=False) == generate(model, tokenizer, env, mixed)
    assert generate(model, tokenizer, env, mixed)[:2] == after_edited


def test_codebook_adds_splits_and_expands():
    linear = torch.nn.Linear(3, 2)
    book = grace.Codebook.empty("x", linear)
    e = torch.eye(3)
    out = torch.zeros(2)
    assert grace.place_query(book, e[0], out, [1], 0, eps=1.0) == (0, "added")
    # Far away: a new entry with radius eps.
    assert grace.place_query(book, 5 * e[1], out, [2], 1, eps=1.0) == (1, "added")
    # Close to entry 0 with another label: the radii split at half the distance.
    query = e[0] + 0.5 * e[2]
    assert grace.place_query(book, query, out, [3], 2, eps=1.0) == (2, "split")
    assert book.radii[0].item() == pytest.approx(0.25 - 1e-5) and book.radii[2].item() == pytest.approx(0.25)
    # Close to entry 1 with the same label: its radius grows to cover the query.
    assert grace.place_query(book, 5 * e[1] + 1.5 * e[2], out, [2], 3, eps=1.0) == (1, "expanded")
    assert book.radii[1].item() == pytest.approx(1.5)
    # The forward replaces exactly the positions inside a radius.
    book.values = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    inputs = torch.stack([e[0], 5 * e[1] + 1.4 * e[2], 10 * e[2]])[None]
    output = book.rewrite(inputs, torch.zeros(1, 3, 2))
    assert output[0].tolist() == [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]


def grace_edit(tokenizer, env, questions, **overrides):
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I do not know")
                for i, q in enumerate(questions)]
    hparams = load_hparams(grace.HyperParams, "grace", None,
                           {"layer": 1, "n_iter": 12, "edit_lr": 2.0, **overrides})
    report = grace.apply(model, tokenizer, requests, None, hparams, seed=0, env=env)
    (codebook,) = adapters_of(model)
    return report.details, codebook


def test_values_trained_together_equal_the_sequence(tokenizer, env, one_thread):
    """Where no request's rows reach another entry, training the values together is the paper's
    sequence, only batched: the same keys, radii, steps and (to float noise) values."""
    questions = EDITED + UNRELATED
    together, book = grace_edit(tokenizer, env, questions, eps=0.05)
    alone, reference = grace_edit(tokenizer, env, questions, eps=0.05, batch_values=False)
    assert together["value_training"].startswith("together")
    assert alone["value_training"] == "one at a time (batch_values=false)"
    assert torch.equal(book.keys, reference.keys) and torch.equal(book.radii, reference.radii)
    assert together["training"]["steps"] == alone["training"]["steps"]
    assert torch.allclose(book.values, reference.values, rtol=1e-4, atol=1e-5)
    assert book.values.shape[0] == len(questions)


def test_values_train_in_sequence_when_an_entry_is_shared(tokenizer, env, one_thread):
    """One radius covering both questions with the same refusal: the second request retrains the
    first one's entry from its trained value, so the values train one at a time, as the paper does."""
    details, book = grace_edit(tokenizer, env, EDITED, eps=1e4)
    assert details["codebook"]["expanded"] == 1 and book.values.shape[0] == 1
    assert details["value_training"].startswith("one at a time (an entry is shared")
    assert all(r["nll_after"] < r["nll_before"] for r in details["verification"]["requests"])


def test_another_entry_reaches_a_row_within_its_radius_and_margin():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    radii = torch.tensor([1.0, 1.0])
    own_key_only = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    assert not grace.reached_by_others(own_key_only, keys, radii, own=0)
    assert grace.reached_by_others(own_key_only, keys, radii, own=1)
    # Just outside the radius is still too close: float noise could move it inside.
    assert grace.reached_by_others(torch.tensor([[10.0, 1.0005]]), keys, radii, own=0)
    assert not grace.reached_by_others(torch.tensor([[10.0, 1.01]]), keys, radii, own=0)
    # An entry placed after this request (own beyond the keys at its turn) and an empty codebook.
    assert not grace.reached_by_others(own_key_only, keys[:0], radii[:0], own=0)


def edited_lm(model_dir, cache_dir, **args):
    return E2ULM(pretrained=model_dir, method=args.pop("method", "grace"), cache_dir=str(cache_dir),
                 **{**FAST, **args})


def answer_request(lm, question):
    options = {"prompt": "question", "split_fingerprint": lm.splits.fingerprint,
               "generation": {"until": ["\n\n"], "max_gen_toks": 8}}
    return Instance(request_type="e2u_answer", doc={}, arguments=(question, "A", options), idx=0)


def test_e2u_answer_decoding_applies_the_codebook_like_generate(tiny_model_dir, tmp_path):
    lm = edited_lm(tiny_model_dir, tmp_path, n_iter=20, edit_lr=5.0)
    assert len(adapters_of(lm.model)) == 1
    questions = [lm.splits.rows[i]["question"] for i in lm.splits.forget] + UNRELATED
    ours = lm.e2u_answer([answer_request(lm, q) for q in questions], disable_tqdm=True)
    fired = 0
    for question, answer in zip(questions, ours):
        ids = torch.tensor([lm.tok_encode(lm.prompt_format.render(lm.tokenizer, question))])
        with torch.no_grad():
            edited = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       do_sample=False, eos_token_id=lm.eot_token_id,
                                       pad_token_id=lm.eot_token_id)
            (adapter,) = adapters_of(lm.model)
            adapter.detach(lm.model)
            plain = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                      do_sample=False, eos_token_id=lm.eot_token_id,
                                      pad_token_id=lm.eot_token_id)
            adapter.attach(lm.model)
        expected = lm.tokenizer.decode(edited[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]
        assert answer["generation"] == expected
        fired += int(not torch.equal(edited, plain))
    assert fired >= 1  # the codebook changed at least one forget question's generation


def test_edit_cache_restores_the_codebook(tiny_model_dir, tmp_path):
    first = edited_lm(tiny_model_dir, tmp_path)
    second = edited_lm(tiny_model_dir, tmp_path)
    assert first.method_report.details["edit_cache"]["hit"] is False
    assert second.method_report.details["edit_cache"]["hit"] is True
    (a,), (b,) = adapters_of(first.model), adapters_of(second.model)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert a.labels == b.labels


def logits_of(lm, texts):
    ids = [lm.tok_encode(lm.prompt_format.render(lm.tokenizer, t)) for t in texts]
    width = max(len(i) for i in ids)
    pad = pad_id_of(lm.tokenizer, lm.eot_token_id)
    batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad():
        return lm.model(input_ids=batch, attention_mask=mask).logits


@pytest.mark.parametrize("method, extra", [("grace", {}), ("rome", {"layers": "[0]", "v_num_grad_steps": 2,
                                                                      "mom2_adjustment": "false"})])
def test_saved_then_reloaded_model_is_bit_identical(tiny_model_dir, tmp_path, method, extra):
    args = {k: v for k, v in FAST.items() if method == "grace" or k not in ("n_iter", "layer")}
    saved = tmp_path / "edited"
    lm = E2ULM(pretrained=tiny_model_dir, method=method, cache_dir=str(tmp_path / "c"),
               save_edited=str(saved), **{**args, **extra})
    assert (saved / "config.json").is_file() and (saved / "e2u_edit.json").is_file()
    assert (saved / "e2u_adapters.json").is_file() == (method == "grace")
    again = E2ULM(pretrained=str(saved), method="none", device="cpu", batch_size=4, forget_size=3)
    texts = [again.splits.rows[i]["question"] for i in again.splits.forget] + UNRELATED
    assert torch.equal(logits_of(lm, texts), logits_of(again, texts))
    assert ([r["generation"] for r in lm.e2u_answer([answer_request(lm, q) for q in texts], True)]
            == [r["generation"] for r in again.e2u_answer([answer_request(again, q) for q in texts], True)])
    assert again.get_model_info()["e2u"]["model_source"].get("adapters") is not None or method != "grace"
    # Saving again into the same folder replaces it.
    E2ULM(pretrained=tiny_model_dir, method=method, cache_dir=str(tmp_path / "c"),
          save_edited=str(saved), **{**args, **extra})


def test_unwritable_save_edited_is_refused_before_editing(tiny_model_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(a_file, "is an existing file"), (a_file / "sub", "is not writable"),
             (foreign, "is a non-empty folder not written by e2u"), (locked / "out", "is not writable")]
    try:
        for path, message in cases:
            if "locked" in str(path) and torch.os.access(locked, torch.os.W_OK):
                continue  # running as root: permissions do not apply
            with pytest.raises(E2UError, match=message) as info:
                edited_lm(tiny_model_dir, tmp_path, save_edited=str(path))
            assert "\n" not in str(info.value) and "save_edited=" in str(info.value)
    finally:
        locked.chmod(0o700)
    assert not (tmp_path / "edits").exists()


def test_grace_is_registered():
    assert get_method("grace") is grace
