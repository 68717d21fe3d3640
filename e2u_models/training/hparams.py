"""Optimisation settings shared by every training-based method and the fine-tuning stage."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

from e2u_tasks.errors import E2UError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainHParams:
    """Optimisation settings shared by every training-based method (names avoid the model args
    ``batch_size``/``max_length``, which they would shadow)."""

    lr: float = 1e-5
    epochs: int = 20
    # Optimizer steps; 0 = as many as ``epochs`` passes over the forget set give.
    max_steps: int = 0
    train_batch_size: int = 4
    grad_accum_steps: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # auto: fp32 on CPU; on GPU bf16 autocast (fp16 with loss scaling where bf16 is unsupported).
    precision: str = "auto"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    max_train_length: int = 512
    # 0: every parameter trains. k > 0: only decoder layers k.. and the final norm (embeddings and
    # head frozen), so the backward pass stops at layer k: fewer FLOPs per step on a CPU.
    train_from_layer: int = 0

    def validate(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise E2UError(f"hparam lr={self.lr} must be > 0 (e.g. lr=1e-5)")
        for name in ("epochs", "train_batch_size", "grad_accum_steps", "max_train_length"):
            if getattr(self, name) < 1:
                raise E2UError(f"hparam {name}={getattr(self, name)} must be >= 1")
        if self.train_from_layer < 0:
            raise E2UError(f"hparam train_from_layer={self.train_from_layer} must be >= 0 (0 = every layer)")
        if self.train_from_layer and self.lora:
            raise E2UError("hparam train_from_layer applies to full fine-tuning; with lora=true choose "
                           "the adapted modules with lora_targets")
        if self.max_steps < 0:
            raise E2UError(f"hparam max_steps={self.max_steps} must be >= 0 (0 = from epochs)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise E2UError(f"hparam warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise E2UError("hparams weight_decay and max_grad_norm must be >= 0 (0 = no clipping)")
        if self.precision not in PRECISIONS:
            raise E2UError(f"hparam precision={self.precision!r} is not accepted; use one of "
                           f"{', '.join(PRECISIONS)}")
        if self.lora:
            if importlib.util.find_spec("peft") is None:
                raise E2UError("lora=true needs the peft package, which is not installed; "
                               "pip install 'e2u[lora]' (or peft), or use lora=false")
            if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
                raise E2UError(f"hparams lora_r={self.lora_r} (>= 1), lora_alpha={self.lora_alpha} "
                               f"(> 0), lora_dropout={self.lora_dropout} ([0, 1)) out of range")
            if not self.lora_targets:
                raise E2UError("hparam lora_targets=[] is empty; name the linear modules to adapt")


    def check_model(self, config) -> None:
        """Nothing to check in the config; defining it makes the model pick the preset matching
        the config (``hparams/<method>/*.yaml``) before the weights are loaded."""
