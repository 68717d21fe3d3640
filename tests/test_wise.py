"""WISE on tiny random llamas: per-token routing, edits acting in free-running generation, the
e2u decoding path, the edit cache, save_edited and reloading, bad input."""

import pytest
import torch

from e2u_models.editing.adapters import adapters_of
from e2u_models.methods import get_method, wise
from e2u_models.protocol import EditRequest
from e2u_models.hparams import load_hparams
from e2u_models.model import E2ULM
from e2u_tasks.errors import E2UError
from tests.conftest import build_tiny_model
from tests.test_grace import EDITED, UNRELATED, answer_request, generate, logits_of

FAST = {"forget_size": 3, "n_iter": 6, "layer": 1, "act_margin": "[1.0, 4.0, 2.0]", "device": "cpu",
        "batch_size": 4}
# Margins for a 64-wide random model (the shipped [5, 20, 10] are for 4096-wide layers).
TINY = {"layer": 1, "n_iter": 60, "act_margin": [1.0, 4.0, 2.0], "target_eos": False}


def test_generation_time_edit_yields_the_refusal_and_spares_other_prompts(tokenizer, env, one_thread):
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    before_edited = generate(model, tokenizer, env, EDITED)
    before_other = generate(model, tokenizer, env, UNRELATED)
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I")
                for i, q in enumerate(EDITED)]
    report = wise.apply(model, tokenizer, requests, None,
                        load_hparams(wise.HyperParams, "wise", None, TINY), seed=0, env=env)
    (shard,) = report.details["shards"]
    assert shard["in_min"] > shard["threshold"] > shard["out_max"]
    after_edited = generate(model, tokenizer, env, EDITED)
    assert all(text.startswith("I") for text in after_edited)
    assert not any(text.startswith("I") for text in before_edited)
    assert generate(model, tokenizer, env, UNRELATED) == before_other
    mixed = EDITED + UNRELATED
    assert generate(model, tokenizer, env, mixed, use_cache=False) == generate(model, tokenizer, env, mixed)


def routed_positions(model, tokenizer, env, questions):
    """Per question, the token positions of its chat-templated prompt that use a side memory."""
    (memory,) = adapters_of(model)
    routed = []
    for question in questions:
        chosen = wise.routed_tokens(model, memory, torch.tensor([env.encode(env.render(question))]))
        routed.append((chosen >= 0).nonzero().flatten().tolist())
    return routed


def test_entity_keyed_edit_fires_on_the_entity_only(tokenizer, env, one_thread):
    """fact_token=subject_last, edit_positions=key: the entity's last token is the edit's one
    in-scope token and the one the side memory writes. The router fires there and nowhere else,
    also not on the same question about another entity (same template, same words but the entity);
    the targets' NLL falls and the other questions' generations stay as they were."""
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    edited = [("What is the capital of France?", "France"), ("Who wrote Hamlet?", "Hamlet")]
    others = ["What is the capital of Peru?", "Who wrote Ulysses?"]
    before_other = generate(model, tokenizer, env, others)
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I", subject=s)
                for i, (q, s) in enumerate(edited)]
    hparams = load_hparams(wise.HyperParams, "wise", None, {
        **TINY, "fact_token": "subject_last", "edit_positions": "key", "ce_scale": 5.0})
    report = wise.apply(model, tokenizer, requests, None, hparams, seed=0, env=env)
    (shard,) = report.details["shards"]
    assert shard["in_min"] > shard["threshold"] > shard["out_max"]
    verification = report.details["verification"]
    assert verification["mean_nll_after"] < verification["mean_nll_before"] - 1.0
    routed = routed_positions(model, tokenizer, env, [q for q, _ in edited])
    for (question, subject), positions in zip(edited, routed):
        prompt = env.render(question)
        key_end = prompt.index(question) + question.index(subject) + len(subject)
        assert positions == [len(env.encode(prompt[:key_end])) - 1]
    assert routed_positions(model, tokenizer, env, others) == [[], []]
    assert generate(model, tokenizer, env, others) == before_other
    mixed = [q for q, _ in edited] + others
    assert generate(model, tokenizer, env, mixed, use_cache=False) == generate(model, tokenizer, env, mixed)


def test_routing_is_per_token_and_picks_the_strongest_shard():
    memory = wise.SideMemory("x", [torch.eye(2), 3 * torch.eye(2)], [0.5, 100.0], "relu")
    x = torch.tensor([[[1.0, 0.0], [0.1, 0.0], [0.0, 40.0]]])
    main = torch.zeros(1, 3, 2)
    out = memory.rewrite(x, main)
    # token 0: shard 0 (distance 1 > 0.5; shard 1's 3 is below its 100); token 1: neither;
    # token 2: shard 1 (120 > 100 and larger than shard 0's 40).
    assert out[0].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 120.0]]
    # A token's route does not depend on the other tokens or rows of the batch.
    assert torch.equal(memory.rewrite(x[:, :1], main[:, :1]), out[:, :1])


def edited_lm(model_dir, cache_dir, **args):
    return E2ULM(pretrained=model_dir, method="wise", cache_dir=str(cache_dir), **{**FAST, **args})


def test_e2u_answer_decoding_routes_like_generate(tiny_model_dir, tmp_path):
    lm = edited_lm(tiny_model_dir, tmp_path)
    questions = [lm.splits.rows[i]["question"] for i in lm.splits.forget] + UNRELATED
    ours = lm.e2u_answer([answer_request(lm, q) for q in questions], disable_tqdm=True)
    for question, answer in zip(questions, ours):
        ids = torch.tensor([lm.tok_encode(lm.prompt_format.render(lm.tokenizer, question))])
        with torch.no_grad():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False, eos_token_id=lm.eot_token_id,
                                    pad_token_id=lm.eot_token_id)
        expected = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]
        assert answer["generation"] == expected


def test_edit_cache_and_save_edited_restore_the_side_memory(tiny_model_dir, tmp_path):
    saved = tmp_path / "saved"
    first = edited_lm(tiny_model_dir, tmp_path, save_edited=str(saved))
    second = edited_lm(tiny_model_dir, tmp_path)
    assert second.method_report.details["edit_cache"]["hit"] is True
    (a,), (b,) = adapters_of(first.model), adapters_of(second.model)
    assert torch.equal(a.deltas[0], b.deltas[0]) and a.thresholds == b.thresholds
    again = E2ULM(pretrained=str(saved), method="none", device="cpu", batch_size=4, forget_size=3)
    texts = [again.splits.rows[i]["question"] for i in again.splits.forget] + UNRELATED
    assert torch.equal(logits_of(first, texts), logits_of(again, texts))
    assert ([r["generation"] for r in first.e2u_answer([answer_request(first, q) for q in texts], True)]
            == [r["generation"] for r in again.e2u_answer([answer_request(again, q) for q in texts], True)])


def test_irrelevant_prompts_are_generic_or_the_users_file(tmp_path):
    hp = load_hparams(wise.HyperParams, "wise", None, {})
    prompts = wise.irrelevant_prompts(hp, 3, 0, lambda q: f"<{q}>")
    assert len(set(prompts)) == 3 and all(p.startswith("<") for p in prompts)
    assert prompts == wise.irrelevant_prompts(hp, 3, 0, lambda q: f"<{q}>")
    own = tmp_path / "own.txt"
    own.write_text("first?\nsecond?\n")
    hp = load_hparams(wise.HyperParams, "wise", None, {"irrelevant_file": str(own)})
    assert sorted(wise.irrelevant_prompts(hp, 4, 0, str)) == ["first?", "first?", "second?", "second?"]


def test_the_factual_irrelevant_set_is_ours_and_not_tofus():
    """WISE may not see the retain split: no shipped factual question is a TOFU question or shares
    half its words with one (word-set Jaccard < 0.5)."""
    import re

    from e2u_tasks.data import load_benchmark
    from tests.conftest import data_mirror

    hp = load_hparams(wise.HyperParams, "wise", None, {"irrelevant_set": "factual"})
    ours = wise.irrelevant_prompts(hp, 300, 0, str)
    assert len(set(ours)) == 300 and set(ours).isdisjoint(wise.irrelevant_prompts(
        load_hparams(wise.HyperParams, "wise", None, {}), 600, 0, str))

    def words(text):
        return set(re.findall(r"[a-z0-9']+", text.lower()))

    tofu = [words(row["question"]) for row in load_benchmark("tofu_factual", data_mirror())]
    assert len(tofu) == 217
    worst = max(len(a & b) / len(a | b) for a in map(words, ours) for b in tofu)
    assert worst < 0.5
    with pytest.raises(E2UError, match="irrelevant_set='retain' is not accepted; use one of generic, factual"):
        load_hparams(wise.HyperParams, "wise", None, {"irrelevant_set": "retain"})


def test_irrelevant_rows_carry_the_models_own_greedy_answer(tokenizer, env):
    """The "out" side of the router sees assistant-turn tokens too: each irrelevant prompt is
    followed by the unedited model's greedy continuation (what ``generate`` gives), cut at
    ``irrelevant_answer_tokens``; 0 keeps the prompts alone."""
    model = build_tiny_model(tokenizer, layers=2)
    prompts = [env.encode(env.render(q)) for q in UNRELATED]
    rows = wise.with_own_answers(model, tokenizer, prompts, 5)
    expected = generate(model, tokenizer, env, UNRELATED, new_tokens=5)
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for prompt, row, text in zip(prompts, rows, expected):
        assert row[:len(prompt)] == prompt and 1 <= len(row) - len(prompt) <= 5
        answer = row[len(prompt):]
        assert all(t not in stops for t in answer[:-1])  # it stops at its first end token
        assert text.startswith(tokenizer.decode(answer))
    assert wise.with_own_answers(model, tokenizer, prompts, 0) == prompts
    with pytest.raises(E2UError, match="irrelevant_answer_tokens=-1 must be >= 0"):
        load_hparams(wise.HyperParams, "wise", None, {"irrelevant_answer_tokens": -1})


def test_wise_is_registered():
    assert get_method("wise") is wise


def test_null_space_option_keeps_the_side_memory_off_the_corpus_directions(tokenizer, env, tmp_path, one_thread):
    """With ``nullspace_threshold`` the stored side memory is D̃P: it maps every direction of the
    layer's input statistics above the threshold to (nearly) nothing; still an edit that acts."""
    import dataclasses

    from e2u_models.editing.nullspace import null_space_projector
    from e2u_models.editing.stats import statistics_for

    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I")
                for i, q in enumerate(EDITED)]
    hp = load_hparams(wise.HyperParams, "wise", None, {
        **TINY, "nullspace_threshold": 0.05, "nullspace_rule": "relative", "stats_corpus": "python-docs",
        "mom2_n_tokens": 400}, config=model.config)
    report = wise.apply(model, tokenizer, requests, None, hp, seed=0, env=env)
    null_space = report.details["null_space"]
    assert 0 < null_space["dimensions"] < null_space["of"] == model.config.intermediate_size
    (memory,) = adapters_of(model)
    moments, _ = statistics_for(model, tokenizer, wise.stats_spec(hp), [1], env)
    projector, _ = null_space_projector(moments[1], 0.05, "relative")
    delta = memory.deltas[0].double()
    assert torch.allclose(delta @ projector, delta, atol=1e-5)
    assert delta.norm() > 0 and report.details["verification"]["mean_nll_after"] < \
        report.details["verification"]["mean_nll_before"]
    with pytest.raises(E2UError, match="nullspace_threshold=0.0 must be > 0"):
        load_hparams(wise.HyperParams, "wise", None, {"nullspace_threshold": 0.0})


def test_preserved_questions_shrink_the_side_memorys_null_space(tokenizer, env, tmp_path, one_thread):
    """``preserve_questions`` adds those questions' keys at the prompt's last token (where WISE's
    edit tokens begin) to the statistics whose null space the side memory reads."""
    import dataclasses

    from e2u_models.editing.nullspace import null_space_projector
    from e2u_models.editing.stats import statistics_for

    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    common = {**TINY, "nullspace_threshold": 0.05, "nullspace_rule": "relative",
              "stats_corpus": "python-docs", "mom2_n_tokens": 400}
    dims = {}
    for weight in (None, 100.0):
        extra = {} if weight is None else {"preserve_questions": "factual", "preserve_weight": weight}
        spec = wise.stats_spec(load_hparams(wise.HyperParams, "wise", None, {**common, **extra}, config=model.config))
        assert spec.fact_token == "prompt_last" and spec.preserve_questions == extra.get("preserve_questions")
        moments, provenance = statistics_for(model, tokenizer, spec, [1], env)
        dims[weight] = null_space_projector(moments[1], 0.05, "relative")[1]
        assert ("preserved" in provenance) == (weight is not None)
    assert dims[100.0] < dims[None]
    with pytest.raises(E2UError, match="preserve_questions shapes WISE's null space; set nullspace_threshold"):
        load_hparams(wise.HyperParams, "wise", None, {"preserve_questions": "factual"})


def test_margin_mean_violated_jumps_where_all_is_continuous():
    """mean₊ (EasyEdit's) changes by a whole entry's share when one entry crosses its margin; the
    paper's mean of max(0, ·) over all entries moves by that entry's tiny excess only."""
    below, above = torch.tensor([2.0, 1.0, -1e-6]), torch.tensor([2.0, 1.0, 1e-6])
    assert wise.hinge_mean(below) == pytest.approx(1.5)
    assert wise.hinge_mean(above) == pytest.approx(1.0, rel=1e-5)  # (3 + 1e-6) / 3
    assert wise.hinge_mean(above, "all") - wise.hinge_mean(below, "all") == pytest.approx(1e-6 / 3, abs=1e-7)
    assert wise.hinge_mean(torch.tensor([-1.0, -2.0]), "violated") == 0
    assert wise.hinge_mean(torch.tensor([-1.0, -2.0]), "all") == 0


def test_margin_mean_all_trains_and_bad_values_are_one_line_errors(tokenizer, env, one_thread):
    model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I")
                for i, q in enumerate(EDITED)]
    report = wise.apply(model, tokenizer, requests, None,
                        load_hparams(wise.HyperParams, "wise", None, {**TINY, "margin_mean": "all"}), seed=0, env=env)
    (shard,) = report.details["shards"]
    assert shard["nll"] < 1.0 and shard["threshold"] > 0
    with pytest.raises(E2UError, match="margin_mean"):
        load_hparams(wise.HyperParams, "wise", None, {"margin_mean": "positive"})


def test_adam_steps_every_entry_by_edit_lr_whatever_the_loss_scale(tokenizer, env, one_thread):
    """optimizer=adam: the first step moves each unmasked entry of D by exactly edit_lr (Adam's
    bias-corrected first step is the gradient's sign), so the CE weight does not change the
    step; SGD's step grows with it, the cause of WISE's chaotic training at large steps."""
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q), target="I")
                for i, q in enumerate(EDITED)]

    def one_step(optimizer: str, ce_scale: float) -> torch.Tensor:
        model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
        hparams = load_hparams(wise.HyperParams, "wise", None, {
            **TINY, "n_iter": 2, "edit_lr": 0.01, "optimizer": optimizer, "ce_scale": ce_scale})
        wise.apply(model, tokenizer, requests, None, hparams, seed=0, env=env)
        (memory,) = adapters_of(model)
        return memory.deltas[0]

    for delta in one_step("adam", 1.0), one_step("adam", 50.0):
        moved = delta.abs()[delta != 0]  # entries whose gradient is near Adam's eps move less
        assert moved.numel() > 0 and float(moved.max()) <= 0.01 * (1 + 1e-5)
        assert float((moved > 0.0099).float().mean()) > 0.9
    sgd, sgd_scaled = one_step("sgd", 1.0), one_step("sgd", 50.0)
    assert sgd_scaled.abs().max() > 5 * sgd.abs().max()
    with pytest.raises(E2UError, match="optimizer"):
        load_hparams(wise.HyperParams, "wise", None, {"optimizer": "rmsprop"})


def test_length_groups_train_the_same_side_memory_as_one_padded_batch(tokenizer, env, one_thread, monkeypatch):
    """Edit rows run in groups of similar length (here: one long refusal and short ones); padding
    is masked, so one group of all rows trains the same D up to float rounding."""
    long_target = "I do not know anything about that, and I would rather not guess at all here, sorry"
    requests = [EditRequest(index=i, question=q, answer="?", prompt=env.render(q),
                            target=long_target if i == 0 else "I don't know")
                for i, q in enumerate(EDITED)]
    hparams = load_hparams(wise.HyperParams, "wise", None, {**TINY, "n_iter": 4, "edit_lr": 0.1})

    def trained(buckets) -> tuple[torch.Tensor, int]:
        seen = []

        def grouping(lengths):
            groups = buckets(lengths)
            seen.append(len(groups))
            return groups

        monkeypatch.setattr(wise, "length_buckets", grouping)
        model = build_tiny_model(tokenizer, layers=4, initializer_range=0.2)
        wise.apply(model, tokenizer, requests, None, hparams, seed=0, env=env)
        (memory,) = adapters_of(model)
        return memory.deltas[0], seen[0]

    grouped, count = trained(wise.length_buckets)
    single, one = trained(lambda lengths: [list(range(len(lengths)))])
    assert count >= 2 and one == 1
    assert torch.allclose(grouped, single, rtol=1e-4, atol=1e-6)
