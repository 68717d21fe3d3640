"""Second-moment statistics: exact against brute force, cached, keyed by what feeds the module."""

import pytest
import torch

from e2u_models.editing.stats import StatsRequest, TextCorpus, feeding_weights_sha256, second_moments
from e2u_tasks.errors import E2UError
from tests.conftest import TRAINING_TEXT, build_tiny_model, build_tiny_tokenizer

MODULES = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=3), tokenizer


def brute_force(model, tokenizer, texts, module, max_length):
    captured = []
    handle = dict(model.named_modules())[module].register_forward_pre_hook(
        lambda mod, inputs: captured.append(inputs[0][0].detach().double()))
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
            model(torch.tensor([ids]))
    handle.remove()
    keys = torch.cat(captured)
    return keys.T @ keys / keys.shape[0]


def test_matches_unbatched_brute_force(tiny, tmp_path):
    model, tokenizer = tiny
    texts = TRAINING_TEXT[:6]
    corpus = TextCorpus.from_texts("unit", texts)
    request = StatsRequest(modules=MODULES, n_tokens=10_000, max_length=16, batch_size=4,
                           dtype="float64")
    moments = second_moments(model, tokenizer, corpus, request, str(tmp_path), log=lambda *_: None)
    for module in MODULES:
        expected = brute_force(model, tokenizer, texts, module, 16)
        assert torch.allclose(moments[module], expected, atol=1e-9)


def test_second_request_is_served_from_the_cache(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    corpus = TextCorpus.from_texts("unit", TRAINING_TEXT[:4])
    request = StatsRequest(modules=MODULES[:1], n_tokens=50, max_length=16)
    first = second_moments(model, tokenizer, corpus, request, str(tmp_path), log=lambda *_: None)
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("recomputed"))
    again = second_moments(model, tokenizer, corpus, request, str(tmp_path), log=lambda *_: None)
    assert torch.equal(first[MODULES[0]], again[MODULES[0]])
    assert first[MODULES[0]].dtype == torch.float32


def test_keys_follow_the_weights_that_feed_each_module(tiny):
    model, tokenizer = tiny
    before = feeding_weights_sha256(model, MODULES)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)
    after = feeding_weights_sha256(model, MODULES)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.sub_(1.0)
    assert before[MODULES[0]] == after[MODULES[0]]  # a later layer does not feed layer 0
    assert before[MODULES[1]] != after[MODULES[1]]


def test_bad_requests_are_one_line_errors(tiny, tmp_path):
    model, tokenizer = tiny
    corpus = TextCorpus.from_texts("unit", ["some text"])
    with pytest.raises(E2UError, match="module 'model.layers.9.mlp.down_proj' does not exist"):
        second_moments(model, tokenizer, corpus, StatsRequest(("model.layers.9.mlp.down_proj",)),
                       str(tmp_path))
    with pytest.raises(E2UError, match="must be positive"):
        StatsRequest(MODULES, n_tokens=0)
    with pytest.raises(E2UError, match="not a text file"):
        TextCorpus.from_path(tmp_path / "missing")


def test_shipped_prose_corpus_does_not_depend_on_the_interpreter(monkeypatch):
    """The default statistics corpus is read from the package, never from CPython's pydoc_data
    (which differs between Python versions); its content is the pinned 3.11 snapshot."""
    import sys

    from e2u_models.editing.stats import python_docs_corpus

    monkeypatch.setitem(sys.modules, "pydoc_data", None)  # an interpreter without pydoc_data
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    corpus = python_docs_corpus()
    assert corpus.identity == "python-docs:snapshot-python3.11"
    assert corpus.content_sha256 == "7a74ae4635c92e7b3686ba2d2bd02848dc94a43457d20122523ba701b73d70f3"
    assert len(list(corpus.texts())) == 1987
