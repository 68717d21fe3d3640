"""The logit lens (nostalgebraist 2020; used as an extraction attack by Patil, Hase & Bansal,
"Can sensitive information be deleted from LLMs?", ICLR 2024): every decoder layer's hidden state
at the prompt's last position, through the final norm and the output head, read as next-token
logits. A deleted answer whose first token still ranks high at some layer is readable there.

Computed from the evaluation's own forward pass (``output_hidden_states``), not a second run.
"""

from __future__ import annotations

import torch

from e2u_models.layers import final_norm


def token_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Rank of each row's ``gold`` token in ``scores`` (rows, vocab): 1 + the number of tokens
    with a strictly greater score (ties count in the gold token's favour), as the e2u ranks.
    (Counting in int32 is exact and several times faster than summing booleans.)"""
    return 1 + (scores > scores.gather(-1, gold[:, None])).to(torch.int32).sum(-1)


@torch.no_grad()
def lens_ranks(model, hidden_states, positions: torch.Tensor, final_logits: torch.Tensor,
               gold: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, layers) ranks of ``gold`` (each row's first answer token) read through the logit
    lens after every decoder layer at each row's sequence index ``positions[row]``.

    ``hidden_states`` is a forward's ``output_hidden_states`` (embeddings, then one entry per
    layer; transformers stores the last one after the final norm, so the last layer's reading
    is the model's own ``final_logits`` at that position, (rows, >= vocab), not recomputed).
    """
    norm, head = final_norm(model), model.get_output_embeddings()
    rows = torch.arange(len(positions), device=positions.device)
    ranks = []
    for hidden in hidden_states[1:-1]:
        scores = head(norm(hidden[rows, positions]))[..., :vocab].float()
        ranks.append(token_ranks(scores, gold))
    ranks.append(token_ranks(final_logits[..., :vocab].float(), gold))
    return torch.stack(ranks, dim=-1)
