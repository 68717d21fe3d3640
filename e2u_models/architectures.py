"""Architecture families: where a causal LM keeps the modules the methods edit, read from
``config.model_type``, so no method needs a module path from the user for a known family.

One table (:data:`FAMILIES`) says, per family, the decoder-layer template, the MLP output
projection (what ROME/MEMIT/AlphaEdit rewrite and GRACE/WISE attach to), the final norm, the head,
the input embeddings, the LoRA target modules, how positions enter (rotary embeddings computed
once per call, or learned absolute embeddings added to the input), whether the MLP output is added
to the residual stream as is (so a change of the layer output equals the same change of the MLP
output), and whether :class:`~e2u_models.layers.LayerRunner` can run its layers directly. Weight
orientation is read from the module itself: transformers' ``Conv1D`` (GPT-2) stores its weight as
[in, out], ``nn.Linear`` as [out, in]; :func:`out_in_weight` gives every engine the [out, in] view.

Hparams that hold module paths declare ``metadata={"architecture": <table field>}``: left unset,
they are filled from the family (at hparams resolution when the config is known, else from the
loaded model); set, they win. A layer placeholder may be written ``{}``, ``%d`` or a path segment
``N`` (lm-eval reads any ``--model_args`` containing ``{`` as JSON, so the command line needs one
of the last two).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from e2u_tasks.errors import E2UError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """Where a family keeps its modules (``{}`` = the layer index) and how its layers are called."""

    name: str
    layers: str = "model.layers.{}"
    mlp_out: str = "model.layers.{}.mlp.down_proj"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    embeddings: str = "model.embed_tokens"
    lora_targets: tuple[str, ...] = LLAMA_PROJECTIONS
    # "rotary": the base model's rotary_emb(hidden, positions) is passed to every layer;
    # "learned": absolute position embeddings are added to the input (nothing per layer).
    positions: str = "rotary"
    # False where the MLP output is normalised before it joins the residual (Gemma-2, OLMo-2
    # post-norms): a value change must then be injected at the MLP output itself.
    residual_mlp: bool = True
    # LayerRunner (fast v*, WISE, training above a frozen lower stack) runs these layers directly.
    fast_layers: bool = True

    @property
    def layer_container(self) -> str:
        return self.layers.rsplit(".", 1)[0]


_LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma")
FAMILIES: dict[str, Family] = {
    **{name: Family(name) for name in _LLAMA_STYLE},
    "phi3": Family("phi3", lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "gemma2": Family("gemma2", residual_mlp=False),
    "olmo2": Family("olmo2", residual_mlp=False),
    "gpt2": Family("gpt2", layers="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj",
                   final_norm="transformer.ln_f", embeddings="transformer.wte",
                   lora_targets=("c_attn", "c_proj", "c_fc"), positions="learned"),
    "gpt_neox": Family("gpt_neox", layers="gpt_neox.layers.{}", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
                       final_norm="gpt_neox.final_layer_norm", embeddings="gpt_neox.embed_in",
                       lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "gptj": Family("gptj", layers="transformer.h.{}", mlp_out="transformer.h.{}.mlp.fc_out",
                   final_norm="transformer.ln_f", embeddings="transformer.wte",
                   lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")),
}
# Hparam fields filled from the family, per table field; the templates among them.
TEMPLATE_FIELDS = ("layers", "mlp_out")
# Field metadata of the hparams holding module paths (unset = the family's).
MLP_OUT = {"architecture": "mlp_out"}
LAYERS = {"architecture": "layers"}


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))


def layer_template(value: str, name: str) -> str:
    """A module path with its layer placeholder as ``{}`` (``%d`` and a segment ``N`` accepted)."""
    text = str(value).strip().replace("%d", "{}")
    text = ".".join("{}" if part == "N" else part for part in text.split("."))
    if text.count("{}") != 1 or "{" in text.replace("{}", "") or "}" in text.replace("{}", ""):
        raise E2UError(f"hparam {name}={value!r} needs exactly one layer placeholder: N, %d or {{}} "
                       "(e.g. transformer.h.N.mlp.c_proj)")
    return text


def architecture_fields(cls: type) -> dict[str, str]:
    """Field name -> table field, for the dataclass fields that declare ``architecture``."""
    return {f.name: f.metadata["architecture"] for f in dataclasses.fields(cls)
            if "architecture" in f.metadata}


def _needed(cls: type, values: dict[str, Any], field_name: str) -> bool:
    """LoRA targets matter only with ``lora=true``; module paths always."""
    if field_name == "lora_targets":
        lora = values.get("lora", next(f.default for f in dataclasses.fields(cls) if f.name == "lora"))
        return str(lora).strip().lower() in ("true", "1", "yes")
    return True


def unknown_family_error(model_type: Any, fields: list[str]) -> E2UError:
    known = ", ".join(sorted(FAMILIES))
    return E2UError(
        f"model_type {model_type!r} is not a known architecture family ({known}); set hparam(s) "
        f"{', '.join(fields)} to this model's module paths with N for the layer index "
        "(e.g. rewrite_module_tmp=model.decoder.layers.N.fc2,layer_module_tmp=model.decoder.layers.N)"
        if any(f != "lora_targets" for f in fields) else
        f"model_type {model_type!r} is not a known architecture family ({known}); set hparam "
        "lora_targets to this model's linear module names (e.g. lora_targets=[q_proj,v_proj])")


def fill_from_family(cls: type, values: dict[str, Any], sources: dict[str, str], config) -> None:
    """Templates normalised; unset architecture fields filled from ``config``'s family (source
    ``"architecture <family>"``); a needed one of an unknown family is one error line.
    ``config`` None: left unset, filled from the loaded model (:func:`with_architecture`)."""
    fields = architecture_fields(cls)
    for name, attribute in fields.items():
        if attribute in TEMPLATE_FIELDS and isinstance(values.get(name), str):
            values[name] = layer_template(values[name], name)
    if config is None:
        return
    family = family_of(config)
    missing = [name for name in fields if values.get(name) is None and _needed(cls, values, name)]
    if family is None:
        if missing:
            raise unknown_family_error(getattr(config, "model_type", None), missing)
        return
    for name, attribute in fields.items():
        if values.get(name) is None:
            value = getattr(family, attribute)
            values[name] = list(value) if isinstance(value, tuple) else value
            sources[name] = f"architecture {family.name}"


def with_architecture(hparams, model):
    """``hparams`` with its unset architecture fields filled from the loaded model's family (the
    Python API with a model instance, or hparams built without a config)."""
    values = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams)}
    unset = {name for name in architecture_fields(type(hparams)) if values[name] is None}
    if not unset:
        return hparams
    fill_from_family(type(hparams), values, {}, model.config)
    return dataclasses.replace(hparams, **{name: values[name] for name in unset})


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def out_in_weight(module) -> torch.Tensor:
    """The module's weight as [out, in], so that its output is ``W x + b`` in every orientation:
    the parameter itself for ``nn.Linear``, its transposed view for ``Conv1D`` (an update added
    to the view in place changes the parameter)."""
    return module.weight.T if is_conv1d(module) else module.weight


def orientation(module) -> str:
    return "Conv1D [in, out]" if is_conv1d(module) else "Linear [out, in]"


def injection_module(model, value_module: str, layer_module: str) -> str:
    """Where a change of ``value_module``'s output is injected into the forward pass: the layer
    output where the value joins the residual stream unchanged (the same sum, and the upper
    layers can then run alone), else the value module itself."""
    family = family_of(model.config)
    if value_module == layer_module or (family is not None and family.residual_mlp):
        return layer_module
    return value_module


def direct_layers_fallback(model, inject_at: str | None = None, layer_module: str | None = None) -> str | None:
    """Why the layers above an injection point cannot be run directly (None: they can): the
    engines then run the whole model with a hook instead, and the methods report this reason."""
    family = family_of(model.config)
    model_type = getattr(model.config, "model_type", None)
    if family is None or not family.fast_layers:
        return (f"model_type {model_type!r} has no direct layer runner: the whole model runs with "
                "hooks instead (same results, slower)")
    if inject_at is not None and inject_at != layer_module:
        return (f"{family.name} normalises the MLP output before the residual: values are injected "
                f"at {inject_at} and the whole model runs with hooks (same results, slower)")
    return None


def engine_record(model, edited_module: str, value_module: str, layer_module: str, fast: bool,
                  log) -> dict[str, Any]:
    """The method report's record of the family, the edited module's weight orientation and the
    engine's fallback, if any (also logged): ``value_module``'s output is what the engine
    changes, ``layer_module`` the decoder layer above which it runs the network."""
    family = family_of(model.config)
    module = dict(model.named_modules())[edited_module]
    record: dict[str, Any] = {"model_type": getattr(model.config, "model_type", None),
                              "family": family.name if family else None,
                              "weight_orientation": orientation(module), "fallbacks": []}
    inject_at = injection_module(model, value_module, layer_module)
    reason = direct_layers_fallback(model, inject_at, layer_module) if fast else None
    if reason is not None:
        record["fallbacks"].append(reason)
        log(f"e2u: {reason}")
    return record
