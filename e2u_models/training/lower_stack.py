"""Training above a frozen lower stack: layers below ``train_from_layer`` run once per example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from e2u_models.layers import FixedPrefixKV, LayerRunner, RecordingKV, additive_mask
from e2u_models.nethook import StopForward, forward_until_stopped, trace
from e2u_models.shared_prefix import common_prefix_length
from e2u_models.training.batching import Example, collate

# Batches with more tokens (after the shared prefix) than this run left-padded instead of packed:
# the packed sequence's attention costs (total tokens)², the padded batch's rows × length².
PACKED_TOKEN_LIMIT = 4096


class FrozenLowerStack(torch.nn.Module):
    """The model with its frozen lower layers replaced by a cache of their output.

    With ``train_from_layer=k`` nothing below layer k changes during training, so the residual
    entering layer k is a fixed function of each sequence: one no-grad pass computes it for every
    example (:meth:`precompute`) and every step then runs only layers k.. on it. Called
    like the model (``input_ids``, ``attention_mask``, ``position_ids``, ``logits_to_keep``) on
    left-padded batches; it returns an object with ``.logits``. When only the last positions'
    logits are asked for (the losses' case), the tokens every row starts with run once and the
    rest runs packed, without padding."""

    def __init__(self, model, from_layer: int, pad_id: int, share_prefix: bool = True) -> None:
        super().__init__()
        runner = LayerRunner(model, from_layer, "train_from_layer", "use train_from_layer=0 for this architecture")
        self.runner = runner
        self.model, self.base, self.from_layer, self.pad_id = model, runner.base, from_layer, pad_id
        self.share_prefix = share_prefix  # False: the plain left-padded pass (benchmarks compare)
        self.upper = runner.layers
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def precompute(self, examples: Sequence[Example], batch_size: int = 16) -> None:
        """Cache the states of these examples in left-padded batches (one pass, not one per row)."""
        device = next(self.model.parameters()).device
        todo = [e for e in {e.ids: e for e in examples}.values() if e.ids not in self.states]
        captured = {}

        def capture(hidden):
            captured["h"] = hidden.detach()
            raise StopForward

        was_training = self.model.training
        self.model.eval()
        try:
            with trace(self.model, inputs={self.upper[0]: capture}):
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start:start + batch_size]
                    batch = collate(chunk, self.pad_id, device)
                    forward_until_stopped(self.base, input_ids=batch.input_ids,
                                          attention_mask=batch.attention_mask, position_ids=batch.position_ids)
                    for row, example in enumerate(chunk):
                        self.states[example.ids] = captured["h"][row, -len(example.ids):].clone()
        finally:
            self.model.train(was_training)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        rows, width = input_ids.shape
        sequences = [tuple(input_ids[row, width - int(attention_mask[row].sum()):].tolist())
                     for row in range(rows)]
        # Sequences not precomputed (e.g. DPO's preferred answers) are computed on first sight.
        self.precompute([Example(-1, ids, 0) for ids in sequences if ids not in self.states])
        shared = 0
        if self.share_prefix and logits_to_keep and rows > 1:
            shared = common_prefix_length(sequences, keep=logits_to_keep)
            if sum(len(ids) for ids in sequences) - rows * shared > PACKED_TOKEN_LIMIT:
                shared = 0  # packed attention grows with the square of the batch's tokens
        if shared:
            hidden = self._run_after_shared_prefix(sequences, shared, logits_to_keep)
        else:
            hidden = self._run_left_padded(sequences, width, attention_mask, position_ids)
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        return _Logits(self.runner.logits(hidden))

    def _run_left_padded(self, sequences, width, attention_mask, position_ids):
        """Every row's full sequence, left-padded as the batch is."""
        device = attention_mask.device
        hidden = torch.zeros((len(sequences), width, self.base.config.hidden_size), device=device,
                             dtype=next(self.base.parameters()).dtype)
        for row, ids in enumerate(sequences):
            hidden[row, width - len(ids):] = self.states[ids]
        allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] \
            & attention_mask[:, None, :].bool()
        return self.runner.run(hidden, additive_mask(allowed, hidden.dtype), position_ids)

    def _run_after_shared_prefix(self, sequences, shared: int, keep: int):
        """The last ``keep`` positions of every row, ``[rows, keep, d]``, computed without padding.

        The tokens all rows share (the chat template's system prompt and user header, a large
        part of a short QA sequence) run once; then the rows' own tokens run packed into one
        sequence, each token attending to the shared keys/values (gradients flow through them) and
        to the earlier tokens of its own row, at its own position."""
        first = self.states[sequences[0]]
        device, dtype = first.device, first.dtype
        record = RecordingKV()
        causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()[None]
        self.runner.run(first[None, :shared], additive_mask(causal, dtype),
                     torch.arange(shared, device=device)[None], record)
        lengths = [len(ids) - shared for ids in sequences]
        packed = torch.cat([self.states[ids][shared:] for ids in sequences])[None]
        row_of = torch.repeat_interleave(torch.arange(len(sequences), device=device),
                                         torch.tensor(lengths, device=device))
        positions = torch.cat([torch.arange(shared, len(ids), device=device) for ids in sequences])[None]
        total = packed.shape[1]
        own_row = (row_of[:, None] == row_of[None, :]) & torch.ones(total, total, dtype=torch.bool,
                                                                    device=device).tril()
        allowed = torch.cat([torch.ones((total, shared), dtype=torch.bool, device=device), own_row], dim=1)
        hidden = self.runner.run(packed, additive_mask(allowed[None], dtype), positions,
                              FixedPrefixKV(record.layers))
        ends = torch.tensor(lengths, device=device).cumsum(0)
        tail = ends[:, None] - keep + torch.arange(keep, device=device)[None]
        return hidden[0, tail]


@dataclass
class _Logits:
    logits: torch.Tensor
