"""Recovery attacks and the logit lens on tiny random llamas: the quantisation grid and what it
touches (WISE side memories, GRACE codebooks), relearning on the half the forget task does not
evaluate, the attack cache, and the lens ranks against a hand computation."""

import pytest
import torch

from e2u_models.attacks.quantize import quantize_model, quantize_rows
from e2u_models.attacks.spec import parse_attack
from e2u_models.editing.adapters import adapters_of
from e2u_models.logit_lens import lens_best
from e2u_models.methods.grace import Codebook
from e2u_models.methods.wise import SideMemory
from e2u_tasks.errors import E2UError
from e2u_tasks.metrics import lens_metrics
from e2u_tasks.splits import SplitSpec
from tests.conftest import build_tiny_model
from tests.test_e2u_answer import CASES, stats_request

# ------------------------------------------------------------------ quantize


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_is_symmetric_round_to_nearest_per_group(bits):
    torch.manual_seed(0)
    weight = torch.randn(3, 10)
    weight[1, 8:] = 0.0
    result = quantize_rows(weight, bits, group_size=4)  # groups [0:4], [4:8], ragged [8:10]
    levels = 2 ** (bits - 1) - 1
    for start, stop in ((0, 4), (4, 8), (8, 10)):
        group, rounded = weight[:, start:stop], result[:, start:stop]
        for row in range(3):
            absmax = group[row].abs().max()
            if absmax == 0:  # an all-zero group stays zero
                assert torch.equal(rounded[row], torch.zeros_like(rounded[row]))
                continue
            step = absmax / levels
            assert torch.allclose(rounded[row], torch.round(group[row] / step) * step)
            assert rounded[row].abs().max() == pytest.approx(absmax.item(), rel=1e-6)
            assert (rounded[row] - group[row]).abs().max() <= step / 2 + 1e-6
    # per-channel (group_size=0): one step per output row
    per_row = quantize_rows(weight, bits, group_size=0)
    step = weight.abs().amax(-1, keepdim=True) / levels
    assert torch.allclose(per_row, torch.round(weight / step) * step)


def test_quantize_changes_every_linear_but_the_head_and_is_idempotent_at_8_bits(tokenizer):
    model = build_tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantize_model(model, bits=8, group_size=16)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and m is not model.get_output_embeddings()}
    assert set(report["parameters"]) == linears and len(linears) == 14
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in linears), name
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize_model(model, bits=8, group_size=16)
    for name, param in model.named_parameters():
        assert torch.equal(param, once[name]), f"{name} changed when quantised again"


def test_wise_side_memory_is_quantised_as_a_weight_and_grace_codebook_is_kept(tokenizer):
    torch.manual_seed(1)
    model = build_tiny_model(tokenizer)
    wise_module, grace_module = "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"
    weight = dict(model.named_modules())[wise_module].weight.detach().float().clone()
    delta = 0.01 * torch.randn_like(weight)
    SideMemory(wise_module, [delta.clone()], [0.5], "silu").attach(model)
    grace_weight = dict(model.named_modules())[grace_module].weight
    codebook = Codebook(grace_module, torch.randn(2, grace_weight.shape[1]), torch.randn(2, grace_weight.shape[0]),
                        torch.ones(2), [[1], [2]], [0, 1])
    codebook.attach(model)
    kept = {k: v.clone() for k, v in codebook.tensors().items()}
    report = quantize_model(model, bits=4, group_size=32)
    memory = next(a for a in adapters_of(model) if a.kind == "wise")
    quantised_main = dict(model.named_modules())[wise_module].weight.float()
    assert torch.allclose(quantised_main + memory.deltas[0], quantize_rows(weight + delta, 4, 32), atol=1e-6)
    assert not torch.allclose(memory.deltas[0], delta)
    assert all(torch.equal(kept[k], v) for k, v in codebook.tensors().items())
    assert report["wise_side_memories"] and report["grace_codebooks"]


# ------------------------------------------------------------------ the attack args and the split


def test_attack_spec_records_only_its_own_settings():
    assert parse_attack({}) is None
    spec = parse_attack({"attack": "Quantize", "attack_bits": "4"})
    assert spec.settings() == {"attack": "quantize", "attack_bits": 4, "attack_group_size": 128}
    spec = parse_attack({"attack": "relearn", "attack_data": "retain", "attack_steps": 3})
    assert spec.settings() == {"attack": "relearn", "attack_steps": 3, "attack_lr": 1e-4,
                               "attack_data": "retain", "attack_lora": False}
    with pytest.raises(E2UError, match="attack_bits=16 is not supported"):
        parse_attack({"attack": "quantize", "attack_bits": 16})


def test_relearning_half_the_forget_rows_evaluates_the_other_half():
    plain = SplitSpec.from_args({"forget_size": 9}).load()
    spec = SplitSpec.from_args({"forget_size": 9, "attack": "relearn"})
    splits = spec.load()
    assert splits.forget == plain.forget and splits.retain == plain.retain
    assert len(splits.relearn) == 4 and set(splits.relearn) < set(splits.forget)
    assert set(splits.evaluated_forget) == set(splits.forget) - set(splits.relearn)
    for split in ("forget", "rephrase"):
        assert [d["index"] for d in splits.docs(split)] == list(splits.evaluated_forget)
    assert splits.fingerprint != plain.fingerprint
    # relearning retain rows holds nothing out; the spec the tasks rebuild agrees with the model's
    assert SplitSpec.from_args({"forget_size": 9, "attack": "relearn", "attack_data": "retain"}).load() \
        .fingerprint == plain.fingerprint
    assert SplitSpec.from_args(spec.as_dict()).load().fingerprint == splits.fingerprint


def test_relearn_trains_on_one_half_and_the_forget_task_evaluates_the_other(tiny_model_dir):
    from e2u_models.model import E2ULM
    from e2u_tasks.task import load_split

    args = dict(pretrained=tiny_model_dir, device="cpu", batch_size=4, forget_size=6, method="ga",
                epochs=1, attack="relearn", attack_steps=2, attack_lr=1e-3)
    lm = E2ULM(**args)
    report = lm.prepared.attack_report
    assert report["rows"] == list(lm.splits.relearn) and len(report["rows"]) == 3
    assert report["details"]["optimizer_steps"] == 2 and report["details"]["changed_parameters"] > 0
    docs = load_split("forget", "tofu_factual", **lm.task_metadata())["test"]
    assert sorted(docs["index"]) == sorted(set(lm.splits.forget) - set(report["rows"]))
    lm._check_split({"split_fingerprint": docs[0]["split_fingerprint"]})  # the model accepts them
    without = load_split("forget", "tofu_factual", **{**lm.task_metadata(), "attack": None})["test"]
    with pytest.raises(E2UError, match="different dataset or forget set"):
        lm._check_split({"split_fingerprint": without[0]["split_fingerprint"], "task": "tofu_forget"})
    # the same edit and attack again: both from their caches, the same weights
    again = E2ULM(**args)
    assert again.prepared.method_report.details["edit_cache"]["hit"]
    assert again.prepared.attack_report["cache"]["hit"]
    for (name, a), b in zip(lm.model.named_parameters(), again.model.parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ the logit lens


def test_lens_metrics_read_the_best_rank():
    assert lens_metrics(3, k=10) == {"lens_mrr": 1 / 3, "lens_hit@10": 1.0}
    assert lens_metrics(30, k=10) == {"lens_mrr": 1 / 30, "lens_hit@10": 0.0}
    with pytest.raises(E2UError):
        lens_metrics(0, k=10)


def hand_lens_ranks(lm, context, answer):
    """One unpadded forward; every layer's last prompt state through norm and head, ranks counted
    (transformers stores the last layer's state already normed)."""
    context_ids, answer_ids = lm._encode_context_answer(context, answer)
    model, gold = lm.model, answer_ids[0]
    with torch.no_grad():
        states = model(torch.tensor([context_ids]), output_hidden_states=True).hidden_states[1:]
        ranks = []
        for layer, state in enumerate(states):
            last = state[0, -1]
            row = model.lm_head(last if layer == len(states) - 1 else model.model.norm(last))
            row = row[: len(lm.tokenizer)]
            ranks.append(1 + sum(1 for v in row.tolist() if v > row[gold].item()))
    return ranks


def hand_lens_best(layer_ranks):
    """(best rank, its layer, 1-based, the deepest on ties) from every layer's rank."""
    best = min(layer_ranks)
    return best, max(layer for layer, rank in enumerate(layer_ranks, 1) if rank == best)


def test_lens_best_matches_a_hand_computation_in_padded_batches(tiny_lm):
    results = tiny_lm.e2u_answer([stats_request(c, a, prompt="rendered", lens=True) for c, a in CASES],
                                  disable_tqdm=True)
    layer_ranks = [hand_lens_ranks(tiny_lm, context, answer) for context, answer in CASES]
    for ranks, got in zip(layer_ranks, results):
        assert (got["lens_rank"], got["lens_layer"]) == hand_lens_best(ranks)
        assert ranks[-1] == got["ranks"][0]  # the last layer is the model's own output
    assert any(got["lens_layer"] < len(ranks) for ranks, got in zip(layer_ranks, results))
    plain = tiny_lm.e2u_answer([stats_request(c, a, prompt="rendered") for c, a in CASES], disable_tqdm=True)
    assert all("lens_rank" not in r for r in plain)
    assert [r["ranks"] for r in plain] == [r["ranks"] for r in results]


def test_lens_best_scans_every_vocabulary_block_when_it_must(monkeypatch):
    """Readings scored block by block give the ranks of full rows: blocks of 7 tokens, gold
    tokens in different blocks, a middle layer that beats the last, one that ties it."""
    import e2u_models.logit_lens as logit_lens
    from tests.conftest import build_tiny_tokenizer

    monkeypatch.setattr(logit_lens, "LENS_VOCAB_BLOCK", 7)
    torch.manual_seed(0)
    model = build_tiny_model(build_tiny_tokenizer(), layers=4)
    vocab = len(model.get_output_embeddings().weight)
    with torch.no_grad():
        states = tuple(torch.randn(3, 5, model.config.hidden_size) for _ in range(5))
        positions, gold = torch.tensor([4, 2, 3]), torch.tensor([3, vocab - 2, 20])
        rows = torch.arange(3)
        readings = [model.lm_head(model.model.norm(state[rows, positions])) for state in states[1:-1]]
        final = torch.randn(3, vocab)
        readings.append(final)
        expected = [[1 + int((r[i] > r[i, gold[i]]).sum()) for r in readings] for i in range(3)]
        final[1] = readings[0][1]  # document 1: the last layer ties layer 1, its best
        expected[1][-1] = expected[1][0]
        best, layer = lens_best(model, states, positions, final, gold, vocab)
    assert list(zip(best.tolist(), layer.tolist())) == [hand_lens_best(ranks) for ranks in expected]
    assert min(layer.tolist()) < 4 and max(gold.tolist()) > 3 * 7  # a middle layer wins; a late block


def test_task_metric_names_follow_lens_and_lens_k():
    from lm_eval.tasks import TaskManager

    from e2u_models.autoload import tasks_dir

    def task(**metadata):
        manager = TaskManager(include_path=tasks_dir(), include_defaults=False, metadata=metadata)
        return manager.load(["tofu_forget"])["tasks"]["tofu_forget"]

    forget = task(lens_k=3)
    assert {"lens_mrr", "lens_hit@3"} <= set(forget._metric_fn_list)
    assert forget.higher_is_better()["lens_hit@3"] is False
    instance = forget.construct_requests(forget.eval_docs[0], "Q?")
    assert instance.arguments[2]["lens"] is True
    assert not any(name.startswith("lens") for name in task(lens="false")._metric_fn_list)


def test_gpt2_conv1d_weights_are_quantised_along_their_inputs():
    """GPT-2 stores Conv1D weights as (in, out): the groups run along the inputs all the same,
    and the lens finds its final norm (ln_f)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from e2u_models.layers import final_norm

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    weight = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (32 in, 128 out)
    report = quantize_model(model, bits=4, group_size=8)
    assert "transformer.h.0.mlp.c_fc.weight" in report["parameters"]
    assert torch.allclose(model.transformer.h[0].mlp.c_fc.weight, quantize_rows(weight.T, 4, 8).T)
    assert final_norm(model) is model.transformer.ln_f
