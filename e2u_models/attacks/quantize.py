"""``attack=quantize``: round-to-nearest weight quantisation of every linear layer, de-quantised
back into the model's dtype (Zhang et al., "Does your LLM truly unlearn? An embarrassingly simple
approach to recover unlearned knowledge", ICLR 2025).

An unlearning update is often smaller than half a quantisation step, so the quantised unlearned
weights round to the quantised original ones and the forgotten answers come back; for an editor
the question is the reverse as well: does a rank-one edit survive rounding?

The grid is symmetric (absmax): per group of ``group_size`` consecutive input weights of one
output row, ``step = max|w| / (2^(bits-1) - 1)`` and ``w -> step * round(w / step)``, levels
``-(2^(bits-1)-1) .. 2^(bits-1)-1``. Symmetric because it is the rounding the paper's analysis is
written in (a step set by the largest magnitude, zero kept exact), so small updates stay below
half a step exactly as there; 0 stays 0, and quantising already-quantised weights changes
nothing. ``group_size=0`` is one group per output row (per channel). Rounding is computed in
float32 and written back in the weight's dtype, so the model is evaluated in its own dtype, with
no CUDA-only kernel.

What is quantised: the weight of every ``nn.Linear`` (and GPT-2 ``Conv1D``, whose weight is
stored transposed) except the output head, which weight-only quantisation tools keep in full
precision (and which tied models share with the input embedding); biases, norms and embeddings
stay. Methods' added state (:mod:`e2u_models.editing.adapters`):

- WISE side memories are weights: side memory k acts as ``W + D_k`` on its module, so it is
  quantised like a weight, ``D_k -> Q(W + D_k) - Q(W)`` (its output is then ``Q(W + D_k) x``);
- GRACE's codebook is activations (keys are layer inputs, values layer outputs, compared and
  swapped at run time), not weights; quantisation tools do not touch it and neither does this
  attack, so a GRACE edit survives unless the quantised lower layers move its keys out of their
  radius.
"""

from __future__ import annotations

import torch

from e2u_models.editing.adapters import adapters_of


def quantize_rows(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` (rows, columns) rounded to the symmetric grid group-wise along the columns,
    as float32 (a ragged last group is its own, smaller group)."""
    rows, columns = weight.shape
    size = columns if group_size <= 0 else min(group_size, columns)
    padded = -(-columns // size) * size
    values = torch.zeros((rows, padded), dtype=torch.float32, device=weight.device)
    values[:, :columns] = weight.float()  # zero padding never changes a group's max |w|
    groups = values.reshape(rows, padded // size, size)
    levels = 2 ** (bits - 1) - 1
    step = groups.abs().amax(dim=-1, keepdim=True) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero group stays zero
    rounded = torch.round(groups / step).clamp(-levels, levels) * step
    return rounded.reshape(rows, padded)[:, :columns]


def _linear_weights(model) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, module, transposed) of every linear layer but the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            found.append((name, module, False))
        elif isinstance(module, Conv1D):  # GPT-2: weight (in, out)
            found.append((name, module, True))
    return found


def quantized(weight: torch.Tensor, bits: int, group_size: int, transposed: bool = False) -> torch.Tensor:
    """The de-quantised weight in its own dtype (``transposed``: stored as (in, out))."""
    rows = weight.T if transposed else weight
    result = quantize_rows(rows, bits, group_size)
    return (result.T if transposed else result).to(weight.dtype)


@torch.no_grad()
def quantize_model(model, bits: int, group_size: int) -> dict:
    """Quantise ``model`` in place; what was quantised and what was left, for the results."""
    modules = dict(model.named_modules())
    side_memories = [a for a in adapters_of(model) if a.kind == "wise"]
    originals = {a.module_name: modules[a.module_name].weight.detach().float().clone()
                 for a in side_memories}
    names = []
    for name, module, transposed in _linear_weights(model):
        module.weight.copy_(quantized(module.weight, bits, group_size, transposed))
        names.append(f"{name}.weight")
    for memory in side_memories:
        original = originals[memory.module_name]
        main = modules[memory.module_name].weight.float()
        memory.deltas = [quantize_rows(original + delta.to(original.device), bits, group_size).to(delta.device)
                         - main.to(delta.device) for delta in memory.deltas]
    grace = [a for a in adapters_of(model) if a.kind == "grace"]
    return {"quantized_weights": len(names), "parameters": names,
            "grid": f"symmetric round-to-nearest, {bits} bits, "
                    + (f"groups of {group_size} inputs" if group_size > 0 else "one group per output row"),
            "output_head": "kept (not quantised)",
            "wise_side_memories": (f"{len(side_memories)} quantised as W + D_k" if side_memories else None),
            "grace_codebooks": (f"{len(grace)} kept (activations, not weights)" if grace else None)}
