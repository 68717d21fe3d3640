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
    a, _, _ = shared.score_answers([r[prefix:] for r in rows], answers)
    b, _, _ = plain.score_answers(rows, answers)
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1, :1], b[1, :1], atol=1e-4)


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny_lm):
    from e2u_models.shared_prefix import SharedPrefixRunner, common_prefix_length

    rows = [tiny_lm.tok_encode(tiny_lm.prompt_format.render(tiny_lm.tokenizer, q))
            for q in ("Who wrote it?", "What is the capital of Italy, and when?", "Why?")]
    prefix = common_prefix_length(rows)
    runner = SharedPrefixRunner(tiny_lm.model, rows[0][:prefix], 0, "cpu")

    def decode(limits):
        logits, cache, mask = runner.score_answers([r[prefix:] for r in rows], [[5], [6], [7]])
        return runner.greedy(logits[:, 0], cache, mask, 10, lambda row, toks: len(toks) >= limits[row])

    full = decode([10, 10, 10])
    early = decode([2, 10, 5])
    assert [len(t) for t in early] == [2, 10, 5]
    assert all(full[i][: len(early[i])] == early[i] for i in range(3))
