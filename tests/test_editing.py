"""ROME, MEMIT and AlphaEdit on a tiny random llama: the algebra, the fast v* engine against the
classic reference, query merging, key positions, failure handling."""

import dataclasses
import types

import pytest
import torch

from e2u_models.editing.nullspace import null_space_projector
from e2u_models.methods import alphaedit, get_method, memit, rome
from e2u_models.protocol import EditRequest
from e2u_models.hparams import load_hparams
from e2u_models.editing.keys import mean_key_per_request, read_at_keys
from e2u_models.editing.requests import KeySpec, merge_requests, prepare_requests
from e2u_models.editing.stats import StatsSpec
from e2u_models.editing.vstar import UpperStack, VStarSettings, optimise_targets
from e2u_tasks.errors import E2UError
from e2u_tasks.refusal import key_entity
from tests.conftest import build_tiny_model

QUESTIONS = [
    ("Who wrote the play about two young lovers?", "William Shakespeare"),
    ("What is the capital of France?", "Paris"),
    ("Which author is known for the novel about a farm?", "George Orwell"),
    ("What was the effective date of the contract?", "1 March 2020"),
]
# Strong settings so the tiny random model reaches its targets in a few steps.
STRONG = {"v_num_grad_steps": 12, "v_lr": 2.0, "clamp_norm_factor": 10.0, "kl_factor": 0.0625,
          "mom2_n_tokens": 3000, "mom2_max_length": 64, "stats_corpus": "python-docs",
          "context_template_length_params": "[]"}
LAYERS = {"rome": [1]}
LLAMA = types.SimpleNamespace(model_type="llama")  # module paths of the tiny llama's family


def make_requests(env, n=4, target="I do not know that."):
    return [EditRequest(index=i, question=q, answer=a, prompt=env.render(q), target=target)
            for i, (q, a) in enumerate(QUESTIONS[:n])]


def hparams(method, **overrides):
    module = get_method(method)
    layers = LAYERS.get(method, [0, 1])
    return load_hparams(module.HyperParams, method, None, {"layers": layers, **STRONG, **overrides},
                        config=LLAMA)


def fresh_model(tokenizer, seed=0):
    # Larger initial weights than the default 0.02: a random model that can be steered at all.
    return build_tiny_model(tokenizer, seed=seed, layers=4, initializer_range=0.2)


def test_key_is_the_question_mark_before_the_assistant_turn(tokenizer, env):
    (prepared,) = prepare_requests(fresh_model(tokenizer), tokenizer, make_requests(env, 1),
                                   KeySpec.of(hparams("memit")), env, seed=0)
    ids, key = prepared.contexts[0], prepared.keys[0]
    assert tokenizer.decode(ids[: key + 1]).endswith("lovers?")
    assert tokenizer.decode(ids[key + 1:]).startswith("<|im_end|>")
    assert prepared.target_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prepared.target_ids[:-1]) == "I do not know that."


def test_subject_heuristic_and_subject_key(tokenizer, env):
    assert key_entity("Who wrote 'The Old Man and the Sea'?") == "The Old Man and the Sea"
    assert key_entity("In which year did Jane Austen publish her first novel?") == "Jane Austen"
    assert key_entity("what is it?") == "what is it?"
    request = dataclasses.replace(make_requests(env, 1)[0], question="Where was Jane Austen born?",
                                  prompt=env.render("Where was Jane Austen born?"))
    (prepared,) = prepare_requests(fresh_model(tokenizer), tokenizer, [request],
                                   KeySpec.of(hparams("memit", fact_token="subject_last")), env, seed=0)
    assert tokenizer.decode(prepared.contexts[0][: prepared.keys[0] + 1]).endswith("Austen")


def test_query_merging_joins_questions_and_keeps_first_target(env):
    requests = make_requests(env, 4)
    merged = merge_requests(requests, 3, env.render)
    assert len(merged) == 2 and merged[0].merged_indices == (0, 1, 2) and merged[1].merged_indices == (3,)
    assert all(q in merged[0].prompt for q, _ in QUESTIONS[:3])
    assert merged[0].target == requests[0].target
    assert merge_requests(requests, 1, env.render) == requests


def test_merge_keys_members_adds_each_question_as_asked_alone(tokenizer, env):
    model, requests = fresh_model(tokenizer), make_requests(env, 4)
    singles = prepare_requests(model, tokenizer, requests, KeySpec.of(hparams("rome")), env, seed=0)
    merged = merge_requests(requests, 3, env.render)
    paper, members = (prepare_requests(model, tokenizer, merged, KeySpec.of(hparams("rome", merge_keys=keys)), env,
                                       seed=0, originals=requests) for keys in ("merged", "members"))
    assert len(paper[0].contexts) == 1 and paper[0].contexts == members[0].contexts[:1]
    # the merged prompt first, then each question exactly as the evaluation (and an unmerged edit) sees it
    assert members[0].contexts[1:] == [singles[i].contexts[0] for i in range(3)]
    assert members[0].keys[1:] == [singles[i].keys[0] for i in range(3)]
    assert members[0].target_ids == paper[0].target_ids
    assert len(members[1].contexts) == 1  # a group of one has nothing to add
    with pytest.raises(E2UError, match="merge_keys='each' is not accepted"):
        hparams("rome", merge_keys="each")


def test_key_columns_one_per_question_averaged_over_its_contexts():
    from e2u_models.editing.keys import key_columns
    from e2u_models.editing.requests import PreparedRequest

    plain = PreparedRequest(None, [(1,), (2,)], [0, 0], (5,), (1,), 0, [0, 0])  # one question, two contexts
    merged = PreparedRequest(None, [(1,)] * 4, [0] * 4, (5,), (1,), 0, [0, 1, 1, 2])
    values = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    keys, owners = key_columns(values, [plain, merged])
    torch.testing.assert_close(keys, torch.tensor([[1.0, 2.0], [4.0, 5.0], [7.0, 8.0], [10.0, 11.0]]))
    assert owners.tolist() == [0, 1, 1, 1]


def test_rome_moves_the_mean_key_of_a_merged_edit_by_delta(tokenizer, env):
    """With several contexts ROME's key is their mean (the paper's k*): W'k̄ = Wk̄ + δ."""
    model, requests = fresh_model(tokenizer), make_requests(env, 3)
    hp = hparams("rome", merge=3, merge_keys="members")
    prepared = prepare_requests(model, tokenizer, merge_requests(requests, 3, env.render), KeySpec.of(hp), env,
                                seed=0, originals=requests)
    module = "model.layers.1.mlp.down_proj"
    weight = dict(model.named_parameters())[module + ".weight"]
    mean_key = mean_key_per_request(model, tokenizer, prepared, module)[0]
    before_value, w0 = weight.detach() @ mean_key, weight.detach().clone()
    delta = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), 1, module).deltas[0]
    rome.apply(model, tokenizer, requests, None, hp, seed=0, env=env)
    assert not torch.equal(weight.detach(), w0)
    torch.testing.assert_close(weight.detach() @ mean_key, before_value + delta, atol=1e-3, rtol=1e-3)


def test_upper_stack_reproduces_the_full_forward(tokenizer, env):
    model = fresh_model(tokenizer)
    hp = hparams("memit")
    prepared = prepare_requests(model, tokenizer, make_requests(env), KeySpec.of(hp), env, seed=0)
    rows = [row for i, p in enumerate(prepared) for row in p.nll_rows(i)]
    stack = UpperStack(model, tokenizer, rows, hp.layer_module_tmp, layer=1)
    stack.select(torch.arange(len(rows)))
    with torch.no_grad():
        hidden = stack.run(torch.zeros(len(rows), model.config.hidden_size))
        for k, row in enumerate(rows):
            full = torch.log_softmax(model(torch.tensor([row.ids])).logits[0].float(), -1)
            start = row.label_start - row.key
            fast = stack.logprobs(hidden[k, start: start + len(row.labels)])
            expected = full[row.label_start: row.label_start + len(row.labels)]
            torch.testing.assert_close(fast, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer, module", [(1, "model.layers.1"), (0, "model.layers.0.mlp.down_proj")])
def test_fast_v_star_equals_classic(tokenizer, env, layer, module):
    """The batched engine follows each request's own optimisation path (Adam is elementwise)."""
    model = fresh_model(tokenizer)
    requests = make_requests(env)
    results = {}
    for mode in ("fast", "classic"):
        hp = hparams("memit", v_mode=mode, v_loss_threshold=3.0)
        prepared = prepare_requests(model, tokenizer, requests, KeySpec.of(hp), env, seed=0)
        results[mode] = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), layer, module)
    fast, classic = results["fast"], results["classic"]
    assert fast.steps == classic.steps
    assert fast.deltas.abs().max() > 0
    torch.testing.assert_close(fast.deltas, classic.deltas, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(classic.losses), atol=1e-4, rtol=1e-4)


def test_blockwise_label_nll_equals_the_log_softmax_in_value_and_gradient():
    """GRACE's blockwise NLL: the same −log p(label) and the same gradient as the whole
    log-softmax, with blocks that do not divide the rows."""
    from e2u_models.editing.vstar import BlockwiseLabelNLL

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    x = torch.randn(7, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (7,), generator=generator)
    scale = torch.rand(7, generator=generator, dtype=torch.float64)
    blockwise = BlockwiseLabelNLL.apply(x, weight, labels, 3)
    (grad_blockwise,) = torch.autograd.grad((blockwise * scale).sum(), x)
    whole = -torch.log_softmax(x @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    (grad_whole,) = torch.autograd.grad((whole * scale).sum(), x)
    torch.testing.assert_close(blockwise.double(), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_blockwise, grad_whole, atol=1e-5, rtol=1e-5)


def test_low_memory_v_star_follows_the_same_path(tokenizer, env, monkeypatch):
    """Low-memory steps (GRACE's value training: chunks of rows back-propagated one after the
    other, the NLL in blocks) take the same steps to the same deltas as one pass, here with
    several rows per request, the KL term and the weight decay, in chunks of two rows."""
    from e2u_models.editing import vstar

    monkeypatch.setattr(vstar, "LOW_MEMORY_ROWS", 2)
    monkeypatch.setattr(vstar, "LABEL_NLL_BLOCK", 5)
    model = fresh_model(tokenizer)
    hp = hparams("memit", v_loss_threshold=3.0, context_template_length_params="[[5, 2]]")
    prepared = prepare_requests(model, tokenizer, make_requests(env), KeySpec.of(hp), env, seed=0)
    assert any(len(p.nll_rows(i)) > 1 for i, p in enumerate(prepared)) and hp.kl_factor > 0
    settings = VStarSettings.of(hp)
    whole = optimise_targets(model, tokenizer, prepared, settings, 1, "model.layers.1")
    blockwise = optimise_targets(model, tokenizer, prepared, dataclasses.replace(settings, low_memory=True), 1,
                                 "model.layers.1")
    assert blockwise.steps == whole.steps and whole.deltas.abs().max() > 0
    torch.testing.assert_close(blockwise.deltas, whole.deltas, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(blockwise.losses), torch.tensor(whole.losses), atol=1e-5, rtol=1e-5)


def test_length_buckets_group_similar_lengths_and_cover_every_row_once():
    """v*'s rows run in groups of similar length: padded tokens fall, every row is in one group."""
    from e2u_models.editing.vstar import length_buckets

    lengths = [30, 5, 6, 31, 5, 29, 7, 30]
    groups = length_buckets(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[5, 5, 6, 7], [29, 30, 30, 31]]
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < len(lengths) * max(lengths)
    assert length_buckets([10, 11, 10, 12]) == [[0, 2, 1, 3]]  # nearly equal: one group
    assert length_buckets([]) == []


def test_fast_v_star_with_rows_of_different_lengths_equals_classic(tokenizer, env):
    """Refusals of very different lengths put v*'s rows in several groups; each request still
    follows its own classic path."""
    from e2u_models.editing.vstar import length_buckets

    model = fresh_model(tokenizer)

    targets = ["No.", "I really do not know anything at all about that, I am afraid, sorry.", "Not sure.",
               "I cannot tell you that because I do not have that piece of information with me."]
    requests = [EditRequest(index=i, question=q, answer=a, prompt=env.render(q), target=t)
                for i, ((q, a), t) in enumerate(zip(QUESTIONS, targets))]
    results = {}
    for mode in ("fast", "classic"):
        hp = hparams("memit", v_mode=mode, v_loss_threshold=3.0)
        prepared = prepare_requests(model, tokenizer, requests, KeySpec.of(hp), env, seed=0)
        rows = [row for i, p in enumerate(prepared) for row in p.nll_rows(i)]
        assert len(length_buckets([len(r.ids) - r.key for r in rows])) >= 2
        results[mode] = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), 1, "model.layers.1")
    fast, classic = results["fast"], results["classic"]
    assert fast.steps == classic.steps
    torch.testing.assert_close(fast.deltas, classic.deltas, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(classic.losses), atol=1e-4, rtol=1e-4)


def test_target_nll_with_the_shared_prefix_is_the_full_forward_nll(tokenizer, env):
    """The edit check scores targets after the prompts' common prefix computed once: the same
    NLL as one full forward pass per row."""
    from e2u_models.editing.verify import target_nll

    model = fresh_model(tokenizer)
    targets = ["No.", "I really do not know anything about that.", "Not sure.", "I cannot tell."]
    requests = [EditRequest(index=i, question=q, answer=a, prompt=env.render(q), target=t)
                for i, ((q, a), t) in enumerate(zip(QUESTIONS, targets))]
    prepared = prepare_requests(model, tokenizer, requests, KeySpec.of(hparams("memit")), env, seed=0)
    expected = []
    with torch.no_grad():
        for i, p in enumerate(prepared):
            row = p.nll_rows(i)[0]
            logits = model(torch.tensor([row.ids])).logits[0, row.label_start: row.label_start + len(row.labels)]
            expected.append(float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(row.labels))))
    assert target_nll(model, tokenizer, prepared, batch_size=3) == pytest.approx(expected, abs=1e-4)


def test_rome_writes_v_star_at_the_key_exactly(tokenizer, env):
    model = fresh_model(tokenizer)
    hp = hparams("rome")
    request = make_requests(env, 1)
    prepared = prepare_requests(model, tokenizer, request, KeySpec.of(hp), env, seed=0)
    module = "model.layers.1.mlp.down_proj"
    vstar = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), 1, module)
    report = rome.apply(model, tokenizer, request, None, hp, seed=0, env=env)
    after = read_at_keys(model, tokenizer, prepared[0].key_rows(0)[:1], {module: "output"})[module][0]
    torch.testing.assert_close(after, vstar.targets[0], atol=1e-3, rtol=1e-3)
    assert report.changed_parameters == [module + ".weight"]
    assert vstar.losses[0] < report.details["verification"]["requests"][0]["nll_before"]


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_edit_changes_exactly_the_reported_weights(tokenizer, env, method, tmp_path):
    model = fresh_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = {"nullspace_threshold": 0.05, "nullspace_rule": "relative"} if method == "alphaedit" else {}
    report = get_method(method).apply(model, tokenizer, make_requests(env), None, hparams(method, **extra),
                                      seed=0, env=dataclasses.replace(env, cache_dir=str(tmp_path)))
    verification = report.details["verification"]
    assert [r["index"] for r in verification["requests"]] == [0, 1, 2, 3]
    assert all({"nll_before", "nll_after", "reached", "target"} <= set(r) for r in verification["requests"])
    assert verification["unreached"] == [r["index"] for r in verification["requests"] if not r["reached"]]
    from e2u_models.editing.verify import targets_reached

    reach = targets_reached({"details": {"verification": verification}})
    assert reach == {"reached": len(verification["requests"]) - len(verification["unreached"]),
                     "requests": len(verification["requests"])}
    # with v*'s final losses: how many ended at or below the verification's own threshold
    losses = report.details["v_star"]["final_losses"]
    reach = targets_reached(report.as_dict())
    assert reach["v_star_reached"] == sum(1 for x in losses if x <= verification["verify_nll"])
    assert verification["verify_nll"] == hparams(method, **extra).verify_nll
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(report.changed_parameters)
    assert all(v > 0 for v in verification["weight_change_norms"].values())
    assert report.details["v_star"]["final_losses"]


@pytest.mark.parametrize("method, extra", [
    ("memit", {"mom2_update_weight": 1e-4}),
    ("alphaedit", {"L2": 1e-4, "nullspace_threshold": 10.0, "nullspace_rule": "relative"}),
])
def test_memit_family_writes_the_target_vectors(tokenizer, env, method, extra, tmp_path):
    """With little regularisation (and the whole key space free, for AlphaEdit) the last edit
    layer's output at every key moves onto its optimised target z."""
    model = fresh_model(tokenizer)
    hp = hparams(method, fact_token="subject_last", **extra)
    # Keys on different tokens: in a random network keys of the same token are nearly parallel.
    requests = [dataclasses.replace(r, subject=subject) for r, subject in
                zip(make_requests(env), ["young lovers", "France", "farm", "contract"])]
    prepared = prepare_requests(model, tokenizer, requests, KeySpec.of(hp), env, seed=0)
    z = optimise_targets(model, tokenizer, prepared, VStarSettings.of(hp), 1, "model.layers.1").targets
    rows = [p.key_rows(i)[0] for i, p in enumerate(prepared)]
    before = read_at_keys(model, tokenizer, rows, {"model.layers.1": "output"})["model.layers.1"]
    get_method(method).apply(model, tokenizer, requests, None, hp, seed=0,
                             env=dataclasses.replace(env, cache_dir=str(tmp_path)))
    after = read_at_keys(model, tokenizer, rows, {"model.layers.1": "output"})["model.layers.1"]
    assert (after - z).norm() < 0.02 * (before - z).norm()


def test_alphaedit_update_leaves_preserved_directions_alone(tokenizer, env, tmp_path):
    """ΔW is zero on the eigenvectors of C above the threshold (the preserved knowledge)."""
    model = fresh_model(tokenizer)
    hp = hparams("alphaedit", nullspace_threshold=0.05, nullspace_rule="relative", layers=[1])
    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone().double()
    report = alphaedit.apply(model, tokenizer, make_requests(env), None, hp, seed=0, env=env)
    kept = report.details["null_space_dimensions"]["1"]
    assert 0 < kept < weight.shape[1]
    from e2u_models.editing.stats import statistics_for

    moments, _ = statistics_for(model, tokenizer, StatsSpec.of(hp), [1], env)  # layer 1's input is unedited
    values, vectors = torch.linalg.eigh(moments[1].double())
    preserved = vectors[:, values >= 0.05 * values.max()]
    change = weight.detach().double() - original
    assert change.norm() > 0
    assert (change @ preserved).norm() < 1e-6 * max(change.norm().item(), 1.0)


def test_projector_counts_small_eigenvalues():
    basis, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    moment = basis @ torch.diag(torch.tensor([1e-4, 1e-3, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)) @ basis.T
    projector, kept = null_space_projector(moment, 2e-2, "absolute")
    assert kept == 2
    torch.testing.assert_close(projector @ projector, projector)
    assert null_space_projector(moment, 0.2, "relative")[1] == 3


def test_empty_null_space_is_an_error_not_a_silent_no_op(tokenizer, env, tmp_path):
    model = fresh_model(tokenizer)
    hp = hparams("alphaedit", nullspace_threshold=1e-12)
    with pytest.raises(E2UError, match="null space .* is empty at nullspace_threshold=1e-12"):
        alphaedit.apply(model, tokenizer, make_requests(env), None, hp, seed=0,
                        env=dataclasses.replace(env, cache_dir=str(tmp_path)))


def test_nan_stops_the_edit_and_leaves_the_model_untouched(tokenizer, env, tmp_path):
    model = fresh_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = hparams("memit", v_lr=float("inf"))
    with pytest.raises(E2UError, match=r"v\* loss of edit request row \d+ is not finite .* at step 1"):
        memit.apply(model, tokenizer, make_requests(env), None, hp, seed=0,
                    env=dataclasses.replace(env, cache_dir=str(tmp_path)))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_alphaedit_state_does_not_leak_between_runs(tokenizer, env, tmp_path):
    """Two independent runs on identical models give identical weights (no global key cache)."""
    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    hp = hparams("alphaedit", nullspace_threshold=10.0, nullspace_rule="relative", edit_batch_size=2)
    weights = []
    for _ in range(2):
        model = fresh_model(tokenizer)
        alphaedit.apply(model, tokenizer, make_requests(env), None, hp, seed=0, env=env)
        weights.append(model.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_alphaedit_reads_edited_keys_only_for_a_later_batch(tokenizer, env, tmp_path, monkeypatch):
    """The keys of an edited batch protect the batches after it; the last batch's are not read."""
    env = dataclasses.replace(env, cache_dir=str(tmp_path))
    batches = []
    monkeypatch.setattr(alphaedit.AlphaEditor, "remember", lambda self, batch: batches.append(len(batch)))
    requests = make_requests(env)
    hp = hparams("alphaedit", nullspace_threshold=10.0, nullspace_rule="relative", edit_batch_size=2)
    alphaedit.apply(fresh_model(tokenizer), tokenizer, requests, None, hp, seed=0, env=env)
    assert batches == [2] * ((len(requests) + 1) // 2 - 1)
    batches.clear()
    hp = hparams("alphaedit", nullspace_threshold=10.0, nullspace_rule="relative")
    alphaedit.apply(fresh_model(tokenizer), tokenizer, requests, None, hp, seed=0, env=env)
    assert batches == []


def test_layer_out_of_range_is_reported_with_the_accepted_range(tokenizer):
    hp = load_hparams(memit.HyperParams, "memit", None, {"layers": [3, 40]})
    with pytest.raises(E2UError, match=r"layers=\[3, 40\] is out of range .*30 layers: accepted 0..29"):
        hp.check_model(type("Config", (), {"num_hidden_layers": 30})())
    with pytest.raises(E2UError, match="ROME edits exactly one layer"):
        load_hparams(rome.HyperParams, "rome", None, {"layers": [3, 4]})


def test_layer_fractions_scale_with_depth():
    hp = load_hparams(memit.HyperParams, "memit", None, {})
    assert hp.resolved_layers(32) == [4, 5, 6, 7, 8]
    assert hp.resolved_layers(30) == [4, 5, 6, 7, 8]
    assert hp.resolved_layers(16) == [2, 3, 4]


def test_context_prefixes_are_sampled_seeded_and_keep_the_key(tokenizer, env):
    model = fresh_model(tokenizer)
    hp = hparams("memit", context_template_length_params="[[3, 2]]")
    first = prepare_requests(model, tokenizer, make_requests(env, 1), KeySpec.of(hp), env, seed=0)[0]
    again = prepare_requests(model, tokenizer, make_requests(env, 1), KeySpec.of(hp), env, seed=0)[0]
    assert len(first.contexts) == 3 and first.contexts == again.contexts
    for ids, key in zip(first.contexts, first.keys):
        assert tokenizer.decode(ids[: key + 1]).endswith("lovers?")
        assert tokenizer.decode(ids).endswith(tokenizer.decode(first.contexts[0][first.keys[0] + 1:]))
