"""Names shared by the task (which emits requests) and the model (which serves them)."""

# Custom lm-eval request type: per-token log-probabilities and ranks of a continuation.
TOKEN_STATS = "token_stats"
# generation_kwargs key: "question" (bare question, the model renders it) or "rendered".
PROMPT_KEY = "e2u_prompt"
