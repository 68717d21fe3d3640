"""Hooks on named modules, the pad-id rule and right padding: the small toolkit the engines use
to read or rewrite activations (in the spirit of the original ROME code's ``nethook``).

:func:`trace` calls a function with a module's main input (before it runs) or main output (after;
a returned tensor replaces it); a callback that has read everything it needs raises
:class:`StopForward`, and :func:`forward_until_stopped` runs a forward that may end that way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch

Probe = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by a hook once everything wanted is read: the rest of the network is not needed."""


def pad_id_of(tokenizer, eot_id: int | None = None) -> int:
    """The id of padding tokens: the tokenizer's pad token, else the end-of-turn token (when the
    caller knows one), else EOS, else 0. Padded positions are always masked, so any id would do;
    one rule keeps every batch of every engine (and the evaluation) built the same way."""
    for candidate in (tokenizer.pad_token_id, eot_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: (ids, attention mask of 1s on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def main_tensor(value):
    """A module's main tensor: the first entry of a tuple output (decoder layers), else itself."""
    return value[0] if isinstance(value, tuple) else value


def _on_input(probe: Probe):
    def hook(module, args, kwargs):
        # Decoder layers may be given their hidden states by keyword.
        probe(args[0] if args else kwargs["hidden_states"])

    return hook


def _on_output(probe: Probe):
    def hook(module, inputs, output):
        replaced = probe(main_tensor(output))
        if replaced is None:
            return None
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    return hook


@contextlib.contextmanager
def trace(model, inputs: Mapping | None = None, outputs: Mapping | None = None):
    """Inside, ``inputs[m](x)`` sees the main input x of module m before it runs and
    ``outputs[m](y)`` its main output y (a returned tensor replaces y); m is a module or a name in
    ``model``. The hooks are removed on exit, whatever happens."""
    named = dict(model.named_modules())
    handles = []
    try:
        for key, probe in (inputs or {}).items():
            module = named[key] if isinstance(key, str) else key
            handles.append(module.register_forward_pre_hook(_on_input(probe), with_kwargs=True))
        for key, probe in (outputs or {}).items():
            module = named[key] if isinstance(key, str) else key
            handles.append(module.register_forward_hook(_on_output(probe)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_until_stopped(forward: Callable, **kwargs) -> None:
    """``forward(**kwargs)``, ended early without error when a hook raises :class:`StopForward`.
    No key/value cache unless asked for: nothing reads it, and a model whose config enables it
    would copy every layer's keys and values into it (the same outputs either way)."""
    kwargs.setdefault("use_cache", False)
    try:
        forward(**kwargs)
    except StopForward:
        pass
