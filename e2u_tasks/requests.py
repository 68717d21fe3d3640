"""Names shared by the task (which emits requests) and the model (which serves them)."""

# Custom lm-eval request type served by the e2u model: the greedy answer to a question plus the
# per-token log-probabilities and ranks of the gold answer (teacher-forced), from one prompt pass.
E2U_ANSWER = "e2u_answer"
