"""The training engine of the unlearning baselines (GA, GD, KL, DPO) and of the fine-tuning stage
(finetune-then-unlearn): batching, losses, the frozen lower stack, and the loop."""
