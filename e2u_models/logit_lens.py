"""The logit lens (nostalgebraist 2020; used as an extraction attack by Patil, Hase & Bansal,
"Can sensitive information be deleted from LLMs?", ICLR 2024): every decoder layer's hidden state
at the prompt's last position, through the final norm and the output head, read as next-token
logits. A deleted answer whose first token still ranks high at some layer is readable there.

Computed from the evaluation's own forward pass (``output_hidden_states``), not a second run.
"""

from __future__ import annotations

import torch

from e2u_models.layers import final_norm

# Vocabulary entries scored per step of the lens's scan: after each block, rows that can no longer
# beat their document's best rank stop being scored.
LENS_VOCAB_BLOCK = 4096


def token_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Rank of each row's ``gold`` token in ``scores`` (rows, vocab): 1 + the number of tokens
    with a strictly greater score (ties count in the gold token's favour), as the e2u ranks.
    (``sum(dtype=int32)`` over the comparison counts in one fused pass; converting the booleans
    first writes a second (rows, vocab) tensor, which costs more than the comparison.)"""
    return 1 + torch.gt(scores, scores.gather(-1, gold[:, None])).sum(-1, dtype=torch.int32)


@torch.no_grad()
def lens_best(model, hidden_states, positions: torch.Tensor, final_logits: torch.Tensor,
              gold: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the best rank of ``gold`` (each row's first answer token) over the logit lens of
    every decoder layer at sequence index ``positions[row]``, and the layer that gives it
    (1-based, the deepest on ties; the last layer is the model's own output).

    ``hidden_states`` is a forward's ``output_hidden_states`` (embeddings, then one entry per
    layer; transformers stores the last one after the final norm, so the last layer's reading
    is the model's own ``final_logits`` at that position, (rows, >= vocab), not recomputed).

    The metrics need only the best rank, so a layer's reading is scored block by block over the
    vocabulary and dropped as soon as as many tokens outscore the gold as outscore it at the
    document's last layer: most readings stop after the first block, and the ranks that can
    matter are counted in full. Ranks as :func:`token_ranks` (the gold's own score from a dot
    product, so a token within float rounding of it may count differently than in a full row).
    """
    best = token_ranks(final_logits[..., :vocab].float(), gold)
    layers = len(hidden_states) - 1
    best_layer = torch.full_like(best, layers)
    if layers < 2:
        return best, best_layer
    norm, head = final_norm(model), model.get_output_embeddings()
    rows = torch.arange(len(positions), device=positions.device)
    # (layers - 1) * rows readings; reading j is layer j // rows + 1 of document j % rows
    readings = norm(torch.stack([hidden[rows, positions] for hidden in hidden_states[1:-1]])).flatten(0, 1)
    document = torch.arange(len(readings), device=readings.device) % len(rows)
    weight, bias = head.weight[:vocab], None if head.bias is None else head.bias[:vocab]
    target = gold[document]
    gold_score = (readings * weight[target]).sum(-1).float()
    if bias is not None:
        gold_score += bias[target].float()
    outscored = torch.zeros(len(readings), dtype=torch.int32, device=readings.device)
    active = torch.arange(len(readings), device=readings.device)
    for start in range(0, vocab, LENS_VOCAB_BLOCK):
        active = active[outscored[active] + 1 < best[document[active]]]
        if not len(active):
            break
        block = slice(start, min(start + LENS_VOCAB_BLOCK, vocab))
        scores = torch.nn.functional.linear(readings[active], weight[block],
                                            None if bias is None else bias[block]).float()
        above = torch.gt(scores, gold_score[active, None])
        own = ((target[active] >= block.start) & (target[active] < block.stop)).nonzero().squeeze(-1)
        above[own, target[active][own] - block.start] = False  # the gold never outscores itself
        outscored[active] += above.sum(-1, dtype=torch.int32)
    # the readings left rank strictly better than their document's last layer: the best of them
    # (the deepest on ties) replaces it
    active = active[outscored[active] + 1 < best[document[active]]]
    found = sorted(zip((outscored[active] + 1).tolist(), (active // len(rows) + 1).tolist(),
                       document[active].tolist()), key=lambda item: (item[0], -item[1]), reverse=True)
    for rank, layer, doc in found:  # the best of a document comes last and stays
        best[doc], best_layer[doc] = rank, layer
    return best, best_layer
