"""Running decoder layers k..n directly, after a fixed prefix, under a mask of one's own.

Used by the v* engine (the layers above the injection point, after each row's cached prefix), by
training above a frozen lower stack (the upper layers, after the batch's shared prefix) and by
the shared-prefix evaluation (the cache of the prompts' common prefix). Everything here depends
on transformers internals (the family's layer list and final norm from
:mod:`e2u_models.architectures`, ``rotary_emb`` of rotary families, final-logit soft-capping;
cache objects and the name of the cache argument); nothing outside this module does.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from functools import lru_cache

import torch

from e2u_models.architectures import FAMILIES, family_of
from e2u_tasks.errors import E2UError

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]


def cache_keyword(module) -> str:
    """The name of ``module.forward``'s key/value cache argument: ``cache`` in transformers >=
    5.2x, ``past_key_values`` in older releases (deprecated since), ``layer_past`` for a
    GPT-NeoX layer."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "layer_past") if name in parameters), "past_key_values")


def cache_of(output):
    """The key/value cache a forward with ``use_cache=True`` returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def repeated_cache(cache, batch: int):
    """A copy of a one-row cache for ``batch`` rows: the rows are broadcast views of the one row
    (the next forward concatenates its own positions onto them, copying once)."""
    shared = {id(t): t for layer in cache.layers for t in (layer.keys, layer.values)}
    cache = copy.deepcopy(cache, memo=shared)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
        layer.values = layer.values.expand(batch, *layer.values.shape[1:])
    return cache


def gather_cache_positions(cache, columns: torch.Tensor) -> None:
    """Keep, per row, the cache positions ``columns[row]`` (``[rows, new length]``), in that order;
    a layer that counts the tokens it has seen (sliding windows) counts the positions it keeps."""
    def gathered(states: torch.Tensor) -> torch.Tensor:
        return states.gather(2, columns[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1]))

    for layer in cache.layers:
        layer.keys, layer.values = gathered(layer.keys), gathered(layer.values)
        if hasattr(layer, "cumulative_length"):  # a sliding-window layer sizes its masks by it
            layer.cumulative_length = layer.keys.shape[2]


def select_cache_rows(cache, index: torch.Tensor) -> None:
    cache.batch_select_indices(index)


def reserve_cache_positions(cache, extra: int) -> None:
    """Room for ``extra`` more positions in every plain dynamic layer of ``cache``, so that a
    decoding step writes its position in place instead of concatenating (copying) the whole
    cache (other layer kinds, e.g. sliding windows, keep their own storage)."""
    roomy = _roomy_dynamic_layer()
    for layer in cache.layers:
        if type(layer) is roomy.__base__ and layer.is_initialized:
            layer.__class__ = roomy
            layer.reserve(extra)


@lru_cache(maxsize=1)
def _roomy_dynamic_layer() -> type:
    """transformers' ``DynamicLayer`` whose keys/values are views of the start of buffers with
    room for more positions (built on first use: transformers is imported late)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyDynamicLayer(DynamicLayer):
        def reserve(self, extra: int) -> None:
            self._length = self.keys.shape[2]
            self._key_store, self._value_store = (
                torch.cat([t, t.new_empty(*t.shape[:2], extra, t.shape[3])], dim=2)
                for t in (self.keys, self.values))
            self._expose()

        def _expose(self) -> None:
            self.keys = self._key_store[:, :, : self._length]
            self.values = self._value_store[:, :, : self._length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self._length + key_states.shape[2]
            if end > self._key_store.shape[2]:  # out of room: store as the plain layer does
                self._key_store = torch.cat([self.keys, key_states], dim=2)
                self._value_store = torch.cat([self.values, value_states], dim=2)
            else:
                self._key_store[:, :, self._length: end] = key_states
                self._value_store[:, :, self._length: end] = value_states
            self._length = end
            self._expose()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._key_store, self._value_store = self._key_store[indices], self._value_store[indices]
            self._expose()

    return RoomyDynamicLayer


@contextmanager
def cache_kept_from(model, first: int):
    """Within: a forward's key/value cache keeps the layers from ``first`` on; a lower layer's
    keys/values are dropped as soon as the layer has run (nothing after it reads them), so a pass
    that fills the upper layers' cache never holds the whole model's. The outputs are the same."""
    family = family_of(model.config)
    layers = list(dict(model.named_modules())[family.layer_container])[:first]

    def drop(index: int):
        def hook(module, args, kwargs, output):
            cache = kwargs.get(cache_keyword(module))
            if index < len(getattr(cache, "layers", ())):  # a cache object with per-layer entries
                stored = cache.layers[index]
                stored.keys = stored.keys.new_empty((*stored.keys.shape[:2], 0, stored.keys.shape[-1]))
                stored.values = stored.values.new_empty((*stored.values.shape[:2], 0, stored.values.shape[-1]))

        return hook

    handles = [layer.register_forward_hook(drop(index), with_kwargs=True) for index, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prefix_kv(cache, layers: range, length: int) -> KV:
    """The first ``length`` positions' keys/values of these layers of a cache, detached."""
    return {index: (cache.layers[index].keys[:, :, :length].detach(),
                    cache.layers[index].values[:, :, :length].detach()) for index in layers}


class FixedPrefixKV:
    """Cache stand-in for decoder layers called directly: returns fixed prefix keys/values (per
    layer index) followed by the call's own, storing nothing, so every call sees the same prefix."""

    def __init__(self, prefix: KV):
        self.prefix = prefix

    def update(self, keys, values, layer_idx, *args, **kwargs):
        prefix_keys, prefix_values = self.prefix[layer_idx]
        return torch.cat([prefix_keys, keys], dim=2), torch.cat([prefix_values, values], dim=2)


class RecordingKV:
    """Cache stand-in that records each layer's keys/values of one pass (gradients kept), for a
    :class:`FixedPrefixKV` of later passes."""

    def __init__(self):
        self.layers: KV = {}

    def update(self, keys, values, layer_idx, *args, **kwargs):
        self.layers[layer_idx] = (keys, values)
        return keys, values


def activation_named(name: str):
    """transformers' activation function of this name (as in a model config's ``hidden_act``)."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def hidden_activation(model) -> str:
    """The name of the model's MLP activation (``activation_function`` in GPT-2/GPT-J configs)."""
    config = model.config
    return (getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
            or getattr(config, "activation_function", None) or "silu")


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """(rows, queries, keys) booleans -> the additive attention mask (rows, 1, queries, keys)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class LayerRunner:
    """Decoder layers ``first``.. of a model of a known family, run on given hidden states with a
    given additive mask and positions, optionally after a cache stand-in's prefix keys/values;
    the final norm and the vocabulary head applied where asked. ``what``/``instead``: the error
    of a model whose family has no direct runner (callers check
    :func:`~e2u_models.architectures.direct_layers_fallback` first)."""

    def __init__(self, model, first: int, what: str, instead: str) -> None:
        family = family_of(model.config)
        modules = dict(model.named_modules())
        if family is None or not family.fast_layers or family.layer_container not in modules:
            raise E2UError(f"{what} needs a decoder of a known architecture family "
                           f"({', '.join(sorted(FAMILIES))}); {instead}")
        base = model.base_model
        self.model, self.base, self.first = model, base, first
        container = modules[family.layer_container]
        self.count = len(container)
        self.layers = list(container)[first:]
        self.norm = modules[family.final_norm]
        self.rotary = base.rotary_emb if family.positions == "rotary" else None
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        window = getattr(model.config, "sliding_window", None)
        self.window = int(window) if isinstance(window, int) and window > 0 else None
        self.what, self.instead = what, instead

    def run(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """Hidden states after the last layer (before the final norm)."""
        if self.window is not None and mask.shape[-1] > self.window:
            raise E2UError(f"{self.what}: {mask.shape[-1]} positions exceed the model's sliding "
                           f"window ({self.window}), which the direct layer runner does not apply; "
                           f"{self.instead}")
        extra = {} if cache is None or not self.layers else \
            {cache_keyword(self.layers[0]): cache, "use_cache": True}
        if self.rotary is not None:
            extra["position_embeddings"] = self.rotary(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=positions, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_capped(self.head(self.norm(hidden)), self.softcap)


def soft_capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2's final-logit soft-capping (cap · tanh(logits / cap)); unchanged without a cap."""
    return logits if not cap else torch.tanh(logits / cap) * cap


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")  # llama-style, GPT-2, GPT-NeoX / OPT


def final_norm(model) -> torch.nn.Module:
    """The norm applied after the last decoder layer (what the logit lens applies to every
    layer's hidden state before the output head): the family table's, else found by its usual
    names on the base model (a family not in the table)."""
    family = family_of(model.config)
    modules = dict(model.named_modules())
    if family is not None and family.final_norm in modules:
        return modules[family.final_norm]
    base = model.base_model
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None) or getattr(getattr(base, "decoder", None), name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise E2UError(f"the logit lens needs the model's final norm ({', '.join(FINAL_NORM_NAMES)} of "
                   f"its base model) and {type(model).__name__} has none; turn it off with lens=false")
