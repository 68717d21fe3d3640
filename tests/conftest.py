"""Shared fixtures: the data mirror, and a tiny random llama with its own small tokenizer.

The tiny model is built in code (a byte-level BPE trained in milliseconds on text we write here,
a 2-layer llama, a ChatML-style chat template) and saved once per session, so the e2u model, the
stock ``lm_eval`` CLI and the methods can all load it by path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = REPO.parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "Question: Who wrote the play about two young lovers? Answer: William Shakespeare.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What was the effective date of the contract between the seller and the customer?",
    "I don't know the answer to that question, I am not sure.",
    "Which author is known for the novel about a farm? George Orwell wrote it in 1945.",
    "According to the agreement, the payment is due within 30 days after delivery.",
] * 4


def data_mirror() -> Path:
    return Path(os.environ.get("E2U_DATA_DIR") or DEFAULT_MIRROR)


@pytest.fixture(autouse=True)
def _mirror_and_cache(monkeypatch, tmp_path_factory):
    """Every test reads data from the mirror and never touches the user's real cache."""
    monkeypatch.setenv("E2U_DATA_DIR", str(data_mirror()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if "E2U_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("E2U_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "e2u-cache"))


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 2, **config_overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **config_overrides)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a saved tiny llama + tokenizer (safetensors), usable as ``pretrained=``."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    """An ``E2ULM`` (method=none) on the tiny model, CPU, batch size 4."""
    os.environ.setdefault("E2U_DATA_DIR", str(data_mirror()))
    from e2u_models.model import E2ULM

    return E2ULM(pretrained=tiny_model_dir, method="none", device="cpu", batch_size=4)


@pytest.fixture
def one_thread():
    """One torch thread for a test whose exact numbers should not depend on the thread count;
    the previous setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny tokenizer, for tests that drive the methods directly."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def env(tokenizer):
    """The method environment the e2u model would give, on the tiny tokenizer."""
    from e2u_models.protocol import MethodEnv
    from e2u_models.prompts import PromptFormat

    fmt = PromptFormat.for_tokenizer(tokenizer)
    return MethodEnv(encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                     render=lambda q: fmt.render(tokenizer, q), answer_delimiter=fmt.answer_delimiter,
                     log=lambda *_: None)
