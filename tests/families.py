"""Tiny random causal LMs of every architecture family e2u knows, built from transformers' own
configs (4 layers, hidden 64), for the per-family tests and ``benchmarks/gpu_check.py``."""

from __future__ import annotations

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "phi3",
                "gpt2", "gpt_neox", "gptj")


def family_config(family: str, tokenizer, layers: int = 4, hidden: int = 64):
    """The config of a tiny ``family`` model over ``tokenizer``'s vocabulary."""
    import transformers as tf

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    heads = 4
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, n_inner=2 * hidden,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, rotary_dim=8,
                             n_inner=2 * hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=512, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config,
               "olmo2": tf.Olmo2Config, "phi3": tf.Phi3Config}
    extra = {"num_key_value_heads": 2}
    if family in ("qwen3", "gemma", "gemma2"):
        extra["head_dim"] = hidden // heads
    if family == "gemma2":
        extra["final_logit_softcapping"] = 30.0
    return classes[family](**common, **extra)


def build_family_model(family: str, tokenizer, seed: int = 0, layers: int = 4, hidden: int = 64):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(family, tokenizer, layers, hidden)).eval()
