"""The custom ``e2u_answer`` request against brute force and ``generate``, and prompt handling."""

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from e2u_tasks.errors import E2UError


GREEDY = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}


def stats_request(context, answer, **options):
    options.setdefault("generation", GREEDY)
    return Instance(request_type="e2u_answer", doc={}, arguments=(context, answer, options), idx=0)


def brute_force(lm, context, answer):
    """Unpadded, unbatched: logits of the whole sequence, ranks by counting."""
    context_ids, answer_ids = lm._encode_context_answer(context, answer)
    ids = torch.tensor([context_ids + answer_ids])
    with torch.no_grad():
        logits = lm.model(ids).logits[0]
    ranks, logprobs = [], []
    for offset, token in enumerate(answer_ids):
        row = logits[len(context_ids) + offset - 1]
        ranks.append(1 + sum(1 for v in row.tolist() if v > row[token].item()))
        logprobs.append(F.log_softmax(row, -1)[token].item())
    return answer_ids, ranks, logprobs


CASES = [
    ("Question: Who wrote the play about two young lovers?\nAnswer:", " William Shakespeare."),
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: When was the contract between the seller and the customer effective, and what "
     "was the payment due after delivery according to the agreement?\nAnswer:", " 06-02-1998."),
]


def test_padded_batches_match_brute_force(tiny_lm):
    results = tiny_lm.e2u_answer([stats_request(c, a, prompt="rendered") for c, a in CASES],
                                  disable_tqdm=True)
    for (context, answer), got in zip(CASES, results):
        tokens, ranks, logprobs = brute_force(tiny_lm, context, answer)
        assert got["tokens"] == tokens
        assert got["ranks"] == ranks
        assert got["logprobs"] == pytest.approx(logprobs, abs=1e-5)


def test_sum_of_logprobs_equals_lm_eval_loglikelihood(tiny_lm):
    stats = tiny_lm.e2u_answer([stats_request(c, a, prompt="rendered") for c, a in CASES],
                                disable_tqdm=True)
    lls = tiny_lm.loglikelihood([Instance("loglikelihood", {}, (c, a), 0) for c, a in CASES],
                                disable_tqdm=True)
    for got, (ll, _greedy) in zip(stats, lls):
        assert sum(got["logprobs"]) == pytest.approx(ll, abs=1e-4)


def test_bare_questions_are_rendered_with_the_chat_template(tiny_lm):
    question, answer = "What is the capital of France?", "Paris"
    rendered = tiny_lm.prompt_format.render(tiny_lm.tokenizer, question)
    assert rendered.endswith("<|im_start|>assistant\n") and question in rendered
    (bare,) = tiny_lm.e2u_answer([stats_request(question, answer, prompt="question")], True)
    (manual,) = tiny_lm.e2u_answer([stats_request(rendered, answer, prompt="rendered")], True)
    assert bare == manual
    # The template's trailing newline belongs to the prompt: only answer tokens are scored.
    assert tiny_lm.tokenizer.decode(bare["tokens"]) == "Paris"


def test_edited_model_refuses_a_task_with_another_forget_set(tiny_model_dir):
    from e2u_models.model import E2ULM

    lm = E2ULM(pretrained=tiny_model_dir, method="none", device="cpu", batch_size=2)
    lm.method = type("FakeMethod", (), {"NAME": "rome"})  # as if an editor had run
    with pytest.raises(E2UError, match="different dataset or forget set"):
        lm.e2u_answer([stats_request("Q?", "A", prompt="question", split_fingerprint="other",
                                      task="tofu_forget")], True)


def test_greedy_answers_match_transformers_generate(tiny_lm):
    """Batched shared-prefix decoding gives what ``generate`` gives row by row."""
    questions = ["What is the capital of France?", "Who wrote the play about two young lovers?",
                 "What was the effective date of the contract?"]
    ours = tiny_lm.e2u_answer([stats_request(q, "Paris", prompt="question") for q in questions],
                              disable_tqdm=True)
    tokenizer = tiny_lm.tokenizer
    for question, answer in zip(questions, ours):
        ids = torch.tensor([tiny_lm.tok_encode(tiny_lm.prompt_format.render(tokenizer, question))])
        with torch.no_grad():
            out = tiny_lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                         do_sample=False, eos_token_id=tiny_lm.eot_token_id,
                                         pad_token_id=tiny_lm.eot_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]
        assert answer["generation"] == expected


def test_sampling_is_refused(tiny_lm):
    with pytest.raises(E2UError, match="decode greedily"):
        tiny_lm.e2u_answer([stats_request("Q?", "A", prompt="question",
                                          generation={"do_sample": True})], True)


def test_shared_prefix_scores_match_unshared_ones(tiny_lm):
    from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length

    rows = [tiny_lm.tok_encode(tiny_lm.prompt_format.render(tiny_lm.tokenizer, q))
            for q in ("Who wrote it?", "What is the capital of Italy, and when?")]
    answers = [[5, 6, 7], [8]]
    prefix = common_prefix_length(rows)
    assert prefix > 5
    shared = SharedPrefixRunner(tiny_lm.model, rows[0][:prefix], 0, "cpu")
    plain = SharedPrefixRunner(tiny_lm.model, [], 0, "cpu")
    a = shared.score_answers([r[prefix:] for r in rows], answers)
    b = plain.score_answers(rows, answers)
    for row, answer in enumerate(answers):
        assert a.answer_logits(row).shape[0] == len(answer)
        assert torch.allclose(a.answer_logits(row), b.answer_logits(row), atol=1e-4)
    # Scoring only (the editors' target check) keeps the same logits and builds no decoding state.
    scored_only = shared.score_answers([r[prefix:] for r in rows], answers, for_decoding=False)
    assert scored_only.cache is None and scored_only.mask is None
    assert torch.equal(scored_only.logits, a.logits)


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny_lm):
    from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length

    rows = [tiny_lm.tok_encode(tiny_lm.prompt_format.render(tiny_lm.tokenizer, q))
            for q in ("Who wrote it?", "What is the capital of Italy, and when?", "Why?")]
    prefix = common_prefix_length(rows)
    runner = SharedPrefixRunner(tiny_lm.model, rows[0][:prefix], 0, "cpu")

    def decode(limits):
        scored = runner.score_answers([r[prefix:] for r in rows], [[5], [6], [7]])
        return runner.greedy(scored.first_logits(), scored.cache, scored.mask, 10,
                             lambda row, toks: len(toks) >= limits[row])

    full = decode([10, 10, 10])
    early = decode([2, 10, 5])
    assert [len(t) for t in early] == [2, 10, 5]
    assert all(full[i][: len(early[i])] == early[i] for i in range(3))


MIXED = [("What is the capital of France?", "Paris"),
         ("Who wrote the play about two young lovers who die for each other?", "William Shakespeare, in 1597."),
         ("Why?", "Because the contract says so, and the seller agreed to every clause of it."),
         ("When was the contract between the seller and the customer effective?", "06-02-1998"),
         ("Name a colour.", "Blue"),
         ("How many legs does a spider have, and how many eyes?", "Eight legs and usually eight eyes."),
         ("Where?", "Rome"),
         ("What is the payment due after delivery according to the agreement?", "Thirty days."),
         ("Who?", "Ada Lovelace, the first programmer")]


def test_length_sorted_batches_match_unpadded_rows_one_by_one(tmp_path, one_thread):
    """Rows of mixed prompt and answer lengths, batched (padding, rows regrouped by length, the
    cache rearranged for decoding), give the answers and statistics of one row at a time."""
    from e2u_models.model import E2ULM
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # larger random weights: varied greedy tokens, not one token repeated
    build_tiny_model(tokenizer, layers=3, initializer_range=0.3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generation = {"until": [], "max_gen_toks": 8}
    requests = [stats_request(q, a, prompt="question", lens=True, generation=generation) for q, a in MIXED]
    batched = E2ULM(pretrained=str(tmp_path), method="none", device="cpu", batch_size=4)
    alone = E2ULM(pretrained=str(tmp_path), method="none", device="cpu", batch_size=1)
    got, reference = batched.e2u_answer(requests, True), alone.e2u_answer(requests, True)
    for mine, single in zip(got, reference):
        assert mine["generation"] == single["generation"] and mine["tokens"] == single["tokens"]
        assert mine["ranks"] == single["ranks"]
        assert (mine["lens_rank"], mine["lens_layer"]) == (single["lens_rank"], single["lens_layer"])
        assert mine["logprobs"] == pytest.approx(single["logprobs"], abs=1e-5)
    assert len({len(r["tokens"]) for r in got}) > 3  # the answers really differ in length
    assert len({r["generation"] for r in got}) == len(got)  # and so do the generations


def test_the_model_batches_by_default_as_the_command_line_does(tiny_model_dir):
    """Without ``batch_size`` (lm-eval's Python API passes none) the model batches as ``lm_eval
    --model e2u`` does; a given size wins."""
    from e2u_models.model import E2ULM
    from e2u_models.terminal import DEFAULT_BATCH_SIZE

    default = E2ULM(pretrained=tiny_model_dir, method="none", device="cpu")
    assert default.batch_size == DEFAULT_BATCH_SIZE
    assert default.get_model_info()["e2u"]["batch_size"] == DEFAULT_BATCH_SIZE  # recorded in the results
    assert E2ULM(pretrained=tiny_model_dir, method="none", device="cpu", batch_size=3).batch_size == 3


def test_length_sorted_batches_are_balanced_and_longest_first(tiny_lm):
    lengths = [5, 9, 2, 7, 7, 1, 3, 8, 4]
    batches = tiny_lm._length_sorted_batches(lengths)  # batch_size 4: three batches of three
    assert [len(b) for b in batches] == [3, 3, 3]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert sorted(len(b) for b in tiny_lm._length_sorted_batches(list(range(13)))) == [3, 3, 3, 4]


def test_decoding_into_reserved_cache_room_changes_no_bit(tiny_lm, monkeypatch, one_thread):
    """Decoding steps write into preallocated cache room instead of concatenating: every step's
    logits are the same bits as with transformers' own concatenating cache, rows leaving included."""
    import e2u_models.shared_prefix as shared_prefix

    rows = [tiny_lm.tok_encode(tiny_lm.prompt_format.render(tiny_lm.tokenizer, q))
            for q in ("Who wrote it?", "What is the capital of Italy, and when?", "Why?")]
    prefix = shared_prefix.common_prefix_length(rows)
    runner = shared_prefix.SharedPrefixRunner(tiny_lm.model, rows[0][:prefix], 0, "cpu")

    def decode():
        seen = []

        def pick(logits):
            seen.append(logits.clone())
            return logits.argmax(-1)

        scored = runner.score_answers([r[prefix:] for r in rows], [[5, 6], [7], [8, 9, 10]])
        tokens = runner.greedy(scored.first_logits(), scored.cache, scored.mask, 9,
                               lambda row, toks: len(toks) >= (3, 9, 6)[row], pick)
        return tokens, seen

    roomy = decode()
    monkeypatch.setattr(shared_prefix, "reserve_cache_positions", lambda cache, extra: None)
    plain = decode()
    assert roomy[0] == plain[0] and [len(t) for t in roomy[0]] == [3, 9, 6]
    assert len(roomy[1]) == 9 and all(torch.equal(a, b) for a, b in zip(roomy[1], plain[1]))


def test_greedy_decoding_of_a_sliding_window_family_equals_the_full_forward(tokenizer):
    """Mistral's cache layers size their attention masks by the tokens they have seen; the
    runner's rearranged cache (prompts alone, realigned) must say how many it holds, or the
    first decoding step's mask is one position off (and the forward fails)."""
    from e2u_models.shared_prefix import SharedPrefixRunner
    from tests.families import build_family_model

    model = build_family_model("mistral", tokenizer)
    assert model.config.sliding_window  # the layer kind this test is about
    prefix = tokenizer("The story so far:", add_special_tokens=False)["input_ids"]
    rows = [prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in (" who wrote it?", " what is the capital of Italy, and when was it founded?")]
    runner = SharedPrefixRunner(model, prefix, tokenizer.pad_token_id, "cpu")
    scored = runner.score_answers([r[len(prefix):] for r in rows], [[5, 6, 7, 8], [9, 10, 11]])
    tokens = runner.greedy(scored.first_logits(), scored.cache, scored.mask, 4,
                           lambda row, toks: len(toks) >= 4)
    for row, generated in zip(rows, tokens):
        ids = list(row)
        with torch.no_grad():
            for _ in range(4):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert generated == ids[len(row):]
