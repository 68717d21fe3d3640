"""Optimisation settings shared by every training-based method and the fine-tuning stage."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from e2u_tasks.errors import E2UError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# weight_decay and max_grad_norm share one message (they were checked together).
NOT_NEGATIVE = {"min": 0, "message": "hparams weight_decay and max_grad_norm must be >= 0 (0 = no clipping)"}


@dataclass(frozen=True)
class TrainHParams:
    """Optimisation settings shared by every training-based method (names avoid the model args
    ``batch_size``/``max_length``, which they would shadow)."""

    lr: float = field(default=1e-5, metadata={"above": 0, "finite": True, "hint": "e.g. lr=1e-5"})
    epochs: int = field(default=20, metadata={"min": 1})
    # Optimizer steps; 0 = as many as ``epochs`` passes over the forget set give.
    max_steps: int = field(default=0, metadata={"min": 0, "hint": "0 = from epochs"})
    train_batch_size: int = field(default=4, metadata={"min": 1})
    grad_accum_steps: int = field(default=1, metadata={"min": 1})
    weight_decay: float = field(default=0.01, metadata=NOT_NEGATIVE)
    warmup_ratio: float = field(default=0.1, metadata={"range": "[0, 1)"})
    max_grad_norm: float = field(default=1.0, metadata=NOT_NEGATIVE)
    # auto: fp32 on CPU; on GPU bf16 autocast (fp16 with loss scaling where bf16 is unsupported).
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Unset: the architecture family's linear modules (e2u_models.architectures).
    lora_targets: list[str] | None = field(default=None, metadata={"architecture": "lora_targets"})
    max_train_length: int = field(default=512, metadata={"min": 1})
    # 0: every parameter trains. k > 0: only decoder layers k.. and the final norm (embeddings and
    # head frozen), so the backward pass stops at layer k: fewer FLOPs per step on a CPU.
    train_from_layer: int = field(default=0, metadata={"min": 0, "hint": "0 = every layer"})

    def validate(self) -> None:
        # Ranges and choices of single fields are declared on the fields; here: rules across fields.
        if self.train_from_layer and self.lora:
            raise E2UError("hparam train_from_layer applies to full fine-tuning; with lora=true choose "
                           "the adapted modules with lora_targets")
        if self.lora:
            if importlib.util.find_spec("peft") is None:
                raise E2UError("lora=true needs the peft package, which is not installed; "
                               "pip install 'e2u[lora]' (or peft), or use lora=false")
            if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
                raise E2UError(f"hparams lora_r={self.lora_r} (>= 1), lora_alpha={self.lora_alpha} "
                               f"(> 0), lora_dropout={self.lora_dropout} ([0, 1)) out of range")
            if self.lora_targets is not None and not self.lora_targets:
                raise E2UError("hparam lora_targets=[] is empty; name the linear modules to adapt")


@dataclass(frozen=True)
class RetainHParams(TrainHParams):
    """Settings of the methods that also train on retain rows (GD, KL; DPO with its retain term)."""

    # Retain rows drawn (uniformly, with replacement) per forget row in each step: the references
    # draw 1. More draws average the retain term over more of the retain set at each step, at the
    # cost of one more forward and backward pass per draw.
    retain_per_forget: int = field(default=1, metadata={"min": 1})
