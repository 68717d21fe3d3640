"""GA, GD, KL, DPO and the shared training loop on tiny random llamas; finetune=<dataset>."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from e2u_models.methods import get_method
from e2u_models.protocol import EditRequest, MethodEnv, uses_retain
from e2u_models.hparams import load_hparams
from e2u_models.training.batching import IGNORE, collate, encode_example
from e2u_models.training.loop import TrainSetup, train
from e2u_models.training.losses import masked_kl, nll, sequence_logprob
from e2u_tasks.errors import E2UError
from tests.conftest import build_tiny_model, build_tiny_tokenizer

UNLEARNING = ("ga", "gd", "kl", "dpo")
QUESTIONS = [("Who wrote the play about two young lovers?", "William Shakespeare"),
             ("What is the capital of France?", "Paris"),
             ("What is the capital of Italy?", "Rome"),
             ("Which author wrote the novel about a farm?", "George Orwell"),
             ("When is the payment due?", "within 30 days"),
             ("Who is the seller?", "the customer")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def env_for(tokenizer, logs=None):
    def render(question):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return MethodEnv(encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                     render=render, log=(logs.append if logs is not None else lambda m: None))


def requests(tokenizer, rows, with_targets=True):
    env = env_for(tokenizer)
    return [EditRequest(index=i, question=q, prompt=env.render(q), answer=a,
                        target="I am not sure about that." if with_targets else None)
            for i, (q, a) in enumerate(rows)]


def hparams_of(method, **overrides):
    module = get_method(method)
    base = {"lr": 3e-3, "epochs": 3, "train_batch_size": 2, "warmup_ratio": 0.0}
    return load_hparams(module.HyperParams, method, None, {**base, **overrides})


def run(method, tokenizer, seed=0, model=None, **overrides):
    model = model or build_tiny_model(tokenizer)
    module = get_method(method)
    forget = requests(tokenizer, QUESTIONS[:3])
    hparams = hparams_of(method, **overrides)
    retain = requests(tokenizer, QUESTIONS[3:], with_targets=False) if uses_retain(module, hparams) else None
    report = module.apply(model, tokenizer, forget, retain, hparams, seed=seed, env=env_for(tokenizer))
    return model, report, forget, retain


def forget_nll(model, tokenizer, forget):
    env = env_for(tokenizer)
    examples = [encode_example(tokenizer, env, r.index, r.prompt, r.answer, 512) for r in forget]
    with torch.no_grad():
        return float(nll(model, collate(examples, tokenizer.pad_token_id, "cpu")))


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", UNLEARNING)
def test_each_method_moves_the_forget_answers_away(method, tokenizer):
    reference = build_tiny_model(tokenizer)
    model, report, forget, _ = run(method, tokenizer, model=build_tiny_model(tokenizer))
    details = report.details
    assert details["optimizer_steps"] == 3 * 2  # 3 rows, batch 2 -> 2 steps per epoch
    assert report.changed_parameters and len(details["losses"]) == 6
    assert forget_nll(model, tokenizer, forget) > forget_nll(reference, tokenizer, forget)
    assert (details["retain_sampling"] is not None) == uses_retain(get_method(method), hparams_of(method))


def test_losses_follow_their_definitions(tokenizer):
    _, ga, _, _ = run("ga", tokenizer)
    assert ga.details["loss_last"] == pytest.approx(-ga.details["loss_parts_last"]["forget_nll"], abs=1e-4)
    _, gd, _, _ = run("gd", tokenizer, forget_weight=0.5, retain_weight=2.0)
    parts = gd.details["loss_parts_last"]
    assert gd.details["loss_last"] == pytest.approx(-0.5 * parts["forget_nll"] + 2.0 * parts["retain_nll"], abs=1e-4)
    _, kl, _, _ = run("kl", tokenizer)
    assert kl.details["loss_parts_last"]["retain_kl"] >= 0
    assert kl.details["reference_model"].startswith("the model just before")
    _, dpo, _, _ = run("dpo", tokenizer, epochs=5)
    # The first step starts at the reference: margin 0, loss log 2.
    assert dpo.details["loss_first"] == pytest.approx(0.6931, abs=1e-3)
    assert dpo.details["loss_parts_last"]["margin"] > 0
    assert dpo.details["retain_sampling"] is None and "retain_nll" not in dpo.details["loss_parts_last"]


def test_dpo_retain_term_is_open_unlearnings(tokenizer):
    """retain_weight α adds α·NLL(retain) to the preference loss and makes DPO read the retain
    split; at α = 0 it reads none (PISTOL's DPO)."""
    module = get_method("dpo")
    assert not uses_retain(module, hparams_of("dpo")) and uses_retain(module, hparams_of("dpo", retain_weight=1.0))
    _, dpo, _, _ = run("dpo", tokenizer, retain_weight=2.0)
    parts = dpo.details["loss_parts_last"]
    assert dpo.details["loss_last"] == pytest.approx(parts["preference_loss"] + 2.0 * parts["retain_nll"], abs=1e-4)
    assert dpo.details["retain_sampling"]["per_forget_example"] == 1
    assert "retain_weight*NLL(retain)" in dpo.details["loss"]
    with pytest.raises(E2UError, match="needs retain rows"):
        module.apply(build_tiny_model(tokenizer), tokenizer, requests(tokenizer, QUESTIONS[:3]), None,
                     hparams_of("dpo", retain_weight=1.0), seed=0, env=env_for(tokenizer))


def test_same_seed_same_weights_other_seed_other_retain_draw(tokenizer):
    a, _, _, _ = run("gd", tokenizer, seed=3)
    b, _, _, _ = run("gd", tokenizer, seed=3)
    c, _, _, _ = run("gd", tokenizer, seed=4)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not all(torch.equal(wa[n], wc[n]) for n in wa)


def test_labels_supervise_answer_and_one_eos_masking_prompt_and_padding_by_position(tokenizer):
    env = env_for(tokenizer)
    (short, long) = requests(tokenizer, [QUESTIONS[1], QUESTIONS[0]])
    examples = [encode_example(tokenizer, env, r.index, r.prompt, r.answer, 512) for r in (short, long)]
    batch = collate(examples, tokenizer.pad_token_id, "cpu")
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # the hard case: padding looks like EOS
    for row, example in enumerate(examples):
        labels = batch.labels[row]
        supervised = labels[labels != IGNORE].tolist()
        assert supervised == list(example.ids[example.prompt_length:])
        assert supervised[-1] == eos and supervised.count(eos) == 1
        assert tokenizer.decode(supervised[:-1]).strip() == (short, long)[row].answer
    width = batch.input_ids.shape[1]
    assert (batch.labels[0, : width - len(examples[0].ids)] == IGNORE).all()  # left padding


def test_padded_batch_scores_each_row_as_alone(tokenizer):
    """Left padding, position ids and the trimmed vocabulary head change nothing per row."""
    model = build_tiny_model(tokenizer)
    env = env_for(tokenizer)
    examples = [encode_example(tokenizer, env, r.index, r.prompt, r.answer, 512)
                for r in requests(tokenizer, QUESTIONS[:4])]
    with torch.no_grad():
        together = sequence_logprob(model, collate(examples, tokenizer.pad_token_id, "cpu"))
        alone = torch.cat([sequence_logprob(model, collate([e], tokenizer.pad_token_id, "cpu"))
                           for e in examples])
        logits = model(torch.tensor([examples[0].ids])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(examples[0].ids[1:])
    manual = logits.gather(-1, targets[:, None])[examples[0].prompt_length - 1:].sum()
    assert torch.allclose(together, alone, atol=1e-4)
    assert float(alone[0]) == pytest.approx(float(manual), abs=1e-4)


def test_kl_ignores_padding(tokenizer):
    torch.manual_seed(0)
    current, reference = torch.randn(1, 5, 11), torch.randn(1, 5, 11)
    mask = torch.ones(1, 5, dtype=torch.long)
    padded_current = torch.cat([current, torch.randn(1, 3, 11)], 1)
    padded_reference = torch.cat([reference, torch.randn(1, 3, 11)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    assert float(masked_kl(current, reference, mask)) == pytest.approx(
        float(masked_kl(padded_current, padded_reference, padded_mask)), rel=1e-5)
    assert float(masked_kl(current, current, mask)) == pytest.approx(0.0, abs=1e-6)


def test_nan_loss_names_the_step_and_restores_the_weights(tokenizer):
    model = build_tiny_model(tokenizer)
    before = weights(model)
    env = env_for(tokenizer)
    examples = [encode_example(tokenizer, env, r.index, r.prompt, r.answer, 512)
                for r in requests(tokenizer, QUESTIONS[:4])]
    calls = []

    def loss(network, step, reference):
        calls.append(1)
        value = nll(network, step.forget)
        return (value * float("nan") if len(calls) == 3 else -value), {}

    with pytest.raises(E2UError, match=r"the loss became nan at optimizer step 3/4") as info:
        train(model, tokenizer, TrainSetup(name="ga", forget=examples, loss=loss),
              hparams_of("ga", epochs=2, train_batch_size=2), seed=0)
    assert "\n" not in str(info.value)
    after = weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_gradient_accumulation_counts_optimizer_steps(tokenizer):
    _, report, _, _ = run("ga", tokenizer, train_batch_size=1, grad_accum_steps=3, epochs=2)
    assert report.details["optimizer_steps"] == 2 and report.details["steps_per_epoch"] == 1
    # 3 rows, accumulation 2: steps after rows 2 and 3 of each epoch.
    _, report, _, _ = run("ga", tokenizer, train_batch_size=1, grad_accum_steps=2, epochs=2)
    assert report.details["optimizer_steps"] == 4 and report.details["epochs_run"] == 2


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
@pytest.mark.parametrize("method", ["gd", "kl"])
def test_lora_trains_an_adapter_and_merges_it_into_plain_weights(method, tokenizer):
    model = build_tiny_model(tokenizer)
    names_before = {n for n, _ in model.named_parameters()}
    model, report, forget, _ = run(method, tokenizer, model=model, lora=True,
                                   lora_targets="[q_proj, v_proj]", lr=1e-2)
    assert {n for n, _ in model.named_parameters()} == names_before  # merged, no lora_* left
    assert report.changed_parameters
    assert all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in report.changed_parameters)
    assert report.details["lora"] is True
    assert all(p.requires_grad for p in model.parameters())  # as before training (a fresh module)


@pytest.mark.parametrize("method", UNLEARNING)
def test_train_from_layer_trains_only_the_upper_layers(method, tokenizer):
    """Partial fine-tuning (through the frozen-layer cache): layer 0 and the (tied) embeddings keep
    their values, layer 1 and the final norm change, and the forget answers still move."""
    reference = build_tiny_model(tokenizer)
    before = weights(reference)
    model, report, forget, _ = run(method, tokenizer, model=build_tiny_model(tokenizer), train_from_layer=1)
    changed = set(report.changed_parameters)
    assert changed and all(".layers.1." in n or n == "model.norm.weight" for n in changed)
    after = weights(model)
    assert all(torch.equal(after[n], before[n]) for n in after if ".layers.0." in n or "embed" in n)
    assert forget_nll(model, tokenizer, forget) > forget_nll(reference, tokenizer, forget)
    assert all(p.requires_grad for p in model.parameters())  # flags as they were before training
    with pytest.raises(E2UError, match=r"train_from_layer=2 is out of range: the model has 2 layers"):
        run("ga", tokenizer, train_from_layer=2)
    with pytest.raises(E2UError, match="train_from_layer=-1 must be >= 0"):
        hparams_of("ga", train_from_layer=-1)


def test_the_frozen_lower_stack_computes_what_the_model_computes(tokenizer):
    """train_from_layer caches the residual entering layer k per sequence (computed in padded
    batches) and runs only layers k..: on a left-padded batch its logits (all positions, and the
    kept tail) are the model's."""
    from e2u_models.training.lower_stack import FrozenLowerStack

    model = build_tiny_model(tokenizer, layers=3)
    env = env_for(tokenizer)
    examples = [encode_example(tokenizer, env, i, env.render(q), a, 512) for i, (q, a) in enumerate(QUESTIONS)]
    batch = collate(examples, tokenizer.pad_token_id, "cpu")
    stack = FrozenLowerStack(model, 2, tokenizer.pad_token_id)
    stack.precompute(examples + examples[:2], batch_size=4)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits
        cached = stack(batch.input_ids, batch.attention_mask, batch.position_ids).logits
        tail = stack(batch.input_ids, batch.attention_mask, batch.position_ids, logits_to_keep=batch.keep).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(cached[real], full[real], atol=1e-5)
    assert torch.allclose(tail, full[:, -batch.keep:], atol=1e-5)
    assert len(stack.states) == len(QUESTIONS)  # one cached state per distinct sequence
    lazy = FrozenLowerStack(model, 2, tokenizer.pad_token_id)  # states computed on first sight
    with torch.no_grad():
        assert torch.allclose(lazy(batch.input_ids, batch.attention_mask, batch.position_ids).logits[real],
                              full[real], atol=1e-5)
    with torch.no_grad():
        assert float(nll(stack, batch)) == pytest.approx(float(nll(model, batch)), abs=1e-5)


def test_the_frozen_lower_stack_runs_the_shared_prefix_once_with_the_same_gradients(tokenizer, monkeypatch):
    """The losses ask for the last positions only; then the rows' common prefix (the chat
    template) runs once and the rows' own tokens run packed, without padding: same loss and same
    gradients of every trained parameter as the full model, fewer tokens through the upper layers."""
    from e2u_models.training import lower_stack as train_module
    from e2u_models.training.lower_stack import FrozenLowerStack
    from e2u_models.shared_prefix import common_prefix_length

    model = build_tiny_model(tokenizer, layers=3)
    env = env_for(tokenizer)
    examples = [encode_example(tokenizer, env, i, env.render(q), a, 512) for i, (q, a) in enumerate(QUESTIONS)]
    batch = collate(examples, tokenizer.pad_token_id, "cpu")
    shared = common_prefix_length([e.ids for e in examples], keep=batch.keep)
    assert shared >= 5  # the rendered chat template
    trained = [p for n, p in model.named_parameters() if ".layers.2." in n or n == "model.norm.weight"]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    stack = FrozenLowerStack(model, 2, tokenizer.pad_token_id)
    stack.precompute(examples)
    seen = []
    hook = model.model.layers[2].register_forward_pre_hook(lambda m, a, k: seen.append(
        (a[0] if a else k["hidden_states"]).shape[:2]), with_kwargs=True)
    try:
        grads = []
        for network in (model, stack):
            seen.clear()
            loss = nll(network, batch)
            grads.append([g.clone() for g in torch.autograd.grad(loss, trained)])
            if network is stack:
                real = sum(len(e.ids) - shared for e in examples)  # packed: no padding
                assert seen == [(1, shared), (1, real)]
            else:
                first_loss = float(loss.detach())
    finally:
        hook.remove()
    assert float(loss.detach()) == pytest.approx(first_loss, abs=1e-5)
    monkeypatch.setattr(train_module, "PACKED_TOKEN_LIMIT", 10)  # a batch too large to pack
    seen.clear()
    hook = model.model.layers[2].register_forward_pre_hook(lambda m, a, k: seen.append(
        (a[0] if a else k["hidden_states"]).shape[:2]), with_kwargs=True)
    try:
        assert float(nll(stack, batch).detach()) == pytest.approx(first_loss, abs=1e-5)
    finally:
        hook.remove()
    assert seen == [tuple(batch.input_ids.shape)]  # left-padded, whole sequences
    for full, cached in zip(*grads):
        assert torch.allclose(full, cached, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_bad_training_hparams_are_one_line_errors(tokenizer, monkeypatch):
    with pytest.raises(E2UError, match=r"hparam lr=0.0 must be > 0"):
        hparams_of("gd", lr=0)
    with pytest.raises(E2UError, match=r"hparam lr=-1e-05 must be > 0"):
        hparams_of("kl", lr=-1e-5)
    with pytest.raises(E2UError, match="precision='fp8' is not accepted"):
        hparams_of("ga", precision="fp8")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(E2UError, match="lora=true needs the peft package, which is not installed"):
        hparams_of("dpo", lora=True)


def test_dpo_prefers_the_requests_refusal(tokenizer):
    model, report, forget, _ = run("dpo", tokenizer, epochs=6)
    assert report.details["preferred"] == "the forget row's refusal target"
    env = env_for(tokenizer)
    refusals = [encode_example(tokenizer, env, r.index, r.prompt, r.target, 512) for r in forget]
    answers = [encode_example(tokenizer, env, r.index, r.prompt, r.answer, 512) for r in forget]
    with torch.no_grad():
        refusal_nll = float(nll(model, collate(refusals, tokenizer.pad_token_id, "cpu")))
        answer_nll = float(nll(model, collate(answers, tokenizer.pad_token_id, "cpu")))
    assert refusal_nll < answer_nll
    with pytest.raises(E2UError, match="dpo needs a refusal target"):
        get_method("dpo").apply(build_tiny_model(tokenizer), tokenizer,
                                requests(tokenizer, QUESTIONS[:2], with_targets=False), None,
                                hparams_of("dpo"), seed=0, env=env)


# --------------------------------------------------------------------------- through the e2u model


def small_dataset(tmp_path: Path) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS) + "\n")
    return str(path)


def e2u(tiny_model_dir, cache_dir, **args):
    from e2u_models.model import E2ULM

    return E2ULM(pretrained=tiny_model_dir, cache_dir=str(cache_dir), device="cpu", batch_size=8,
                 **args)


FINETUNE = {"finetune_lr": 1e-2, "finetune_epochs": 40, "finetune_train_batch_size": 6,
            "finetune_target_rouge": 0.8, "finetune_check_rows": 3, "finetune_warmup_ratio": 0.0}


def test_finetune_reaches_the_target_caches_it_and_the_method_starts_from_it(tiny_model_dir, tmp_path):
    data = small_dataset(tmp_path)
    first = e2u(tiny_model_dir, tmp_path, finetune=data, method="gd", forget_size=2, epochs=1, **FINETUNE)
    info = first.get_model_info()["e2u"]
    ft = info["finetune"]
    assert ft["target_reached"] and ft["rouge1_all"] >= 0.8 and not ft["cache_hit"]
    assert ft["epochs_run"] < 40 and ft["rouge_history"][-1]["rouge1_all"] == ft["rouge1_all"]
    assert info["split"]["dataset"] == data  # evaluated on the finetune dataset by default
    assert info["uses_retain_split"] is True and info["method"] == "gd"
    assert (tmp_path / "finetuned" / ft["cache_key"] / "weights.safetensors").is_file()
    second = e2u(tiny_model_dir, tmp_path, finetune=data, method="gd", forget_size=2, epochs=1, **FINETUNE)
    assert second.finetune_report["cache_hit"] is True
    # The cached model says on which machine it was fine-tuned.
    assert second.finetune_report["computed_on"] == ft["computed_on"] == info["fingerprint"]
    assert second.method_report.details["edit_cache"]["hit"] is True
    a, b = weights(first.model), weights(second.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    json.dumps(info)


def test_corrupted_finetune_cache_is_recomputed(tiny_model_dir, tmp_path):
    data = small_dataset(tmp_path)
    args = {**FINETUNE, "finetune_epochs": 2, "finetune_target_rouge": 1.0}
    first = e2u(tiny_model_dir, tmp_path, finetune=data, method="none", forget_size=2, **args)
    assert first.finetune_report["target_reached"] is False  # 2 epochs: recorded, not hidden
    (entry,) = (tmp_path / "finetuned").iterdir()
    weights_file = entry / "weights.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-8] + b"\x00" * 8)
    again = e2u(tiny_model_dir, tmp_path, finetune=data, method="none", forget_size=2, **args)
    assert again.finetune_report["cache_hit"] is False
    a, b = weights(first.model), weights(again.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("args, message", [
    ({"finetune": "no_such_set"}, r"finetune='no_such_set': dataset 'no_such_set' is neither a built-in "
                                  r"benchmark \(known_facts, pistol, tofu_factual\)"),
    ({"finetune_lr": "0", "finetune": "pistol"}, r"hparam lr=0.0 must be > 0"),
    ({"finetune_epochs": "3"}, r"finetune_\* model args need finetune=<dataset>"),
    ({"method": "gd", "lr": "-1"}, r"hparam lr=-1.0 must be > 0"),
    ({"method": "kl", "precision": "fp8"}, r"precision='fp8' is not accepted"),
])
def test_bad_unlearning_args_fail_before_any_training(tiny_model_dir, tmp_path, monkeypatch, args, message):
    import e2u_models.training.loop as train_module

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(E2UError, match=message) as info:
        e2u(tiny_model_dir, tmp_path, **args)
    assert "\n" not in str(info.value)


def test_lora_without_peft_is_one_line_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    for args in ({"method": "kl", "lora": "true"}, {"method": "none", "finetune": "pistol", "finetune_lora": "true"}):
        with pytest.raises(E2UError, match="lora=true needs the peft package") as info:
            e2u(tiny_model_dir, tmp_path, **args)
        assert "\n" not in str(info.value)


def test_unlearning_presets_are_chosen_by_config():
    from e2u_models.hparams import resolve_hparams_path

    smol = type("Config", (), {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576})()
    llama2 = type("Config", (), {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
                                 "vocab_size": 32000})()
    for method in (*UNLEARNING, "finetune"):
        assert Path(resolve_hparams_path(method, None, smol)).stem == "smollm2-135m"
        assert Path(resolve_hparams_path(method, None, llama2)).stem == "llama2-7b-chat"
    assert load_hparams(get_method("gd").HyperParams, "gd").lr == 1e-5  # the paper's setting


def test_a_model_and_dataset_preset_wins_for_its_dataset_only():
    """The plain PISTOL command gets PISTOL's GD preset, TOFU keeps the model's, and a model
    without a PISTOL preset keeps its own."""
    from e2u_models.hparams import resolve_hparams_path

    smol = type("Config", (), {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576})()
    llama2 = type("Config", (), {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
                                 "vocab_size": 32000})()
    assert Path(resolve_hparams_path("gd", None, smol, "pistol")).stem == "smollm2-135m-pistol"
    assert Path(resolve_hparams_path("gd", None, smol, "tofu_factual")).stem == "smollm2-135m"
    assert Path(resolve_hparams_path("gd", None, smol)).stem == "smollm2-135m"
    assert Path(resolve_hparams_path("gd", None, llama2, "pistol")).stem == "llama2-7b-chat"
    pistol = load_hparams(get_method("gd").HyperParams, "gd", resolve_hparams_path("gd", None, smol, "pistol"))
    model = load_hparams(get_method("gd").HyperParams, "gd", resolve_hparams_path("gd", None, smol))
    # the PISTOL preset inherits the model preset's lr and sets its own epochs and retain weight
    assert pistol.lr == model.lr and pistol.epochs > model.epochs
    assert pistol.retain_weight != model.retain_weight


def test_pistols_ga_kl_dpo_keep_the_setting_of_the_pistol_report():
    """The dev-tuned SmolLM2 presets of GA, KL and DPO are TOFU's and known facts'; on PISTOL the
    three keep lr 5e-5 for 2 epochs, and DPO no retain term (PISTOL's DPO, never reading retain)."""
    from e2u_models.hparams import resolve_hparams_path
    from e2u_models.protocol import uses_retain

    smol = type("Config", (), {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576})()
    for method in ("ga", "kl", "dpo"):
        module = get_method(method)
        path = resolve_hparams_path(method, None, smol, "pistol")
        assert Path(path).stem == "smollm2-135m-pistol"
        pistol = load_hparams(module.HyperParams, method, path)
        assert (pistol.lr, pistol.epochs) == (5e-5, 2)
        tofu = load_hparams(module.HyperParams, method, resolve_hparams_path(method, None, smol, "tofu_factual"))
        assert tofu != pistol  # the dev-tuned setting is not PISTOL's
    dpo = get_method("dpo")
    assert not uses_retain(dpo, load_hparams(dpo.HyperParams, "dpo", resolve_hparams_path("dpo", None, smol, "pistol")))
    assert uses_retain(dpo, load_hparams(dpo.HyperParams, "dpo", resolve_hparams_path("dpo", None, smol)))


def test_the_pistol_command_records_the_preset_that_ran(tiny_model_dir, tmp_path, monkeypatch):
    """Presets match the config, so a tiny model gets the generic file; the dataset still reaches
    the choice (the SmolLM2 case is above): the results name the file and where each value came from."""
    import e2u_models.hparams as hp

    chosen = {}
    real = hp.preset_for

    def spy(method, config, dataset=None):
        chosen[method] = dataset
        return real(method, config, dataset)

    monkeypatch.setattr(hp, "preset_for", spy)
    e2u(tiny_model_dir, tmp_path, method="gd", dataset="pistol", forget_edge="A_B", epochs=1)
    assert chosen["gd"] == "pistol"


def test_retain_per_forget_draws_that_many_retain_rows_per_forget_row(tokenizer, monkeypatch):
    """Each step's retain batch holds k rows per forget row (k = 1: the references' one draw)."""
    import e2u_models.methods.gd as gd

    rows_seen = []

    def counting_nll(network, batch):
        rows_seen.append(batch.input_ids.shape[0])
        return nll(network, batch)

    monkeypatch.setattr(gd, "nll", counting_nll)
    for k in (1, 3):
        rows_seen.clear()
        _, report, _, _ = run("gd", tokenizer, retain_per_forget=k)
        forget_rows, retain_rows = rows_seen[0::2], rows_seen[1::2]
        assert retain_rows == [k * n for n in forget_rows]
        assert report.details["retain_sampling"]["per_forget_example"] == k
    with pytest.raises(E2UError, match="retain_per_forget"):
        hparams_of("kl", retain_per_forget=0)
