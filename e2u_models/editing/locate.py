"""The hyperparameters shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit) and the
lookup of the modules they edit; GRACE's and WISE's one-layer choice.

These methods rewrite the weight W of one MLP output projection per edited layer so that a *key*
k (the projection's input at one token of the prompt) maps to a new *value* that makes the model
produce the target. The engines they share take small settings objects built from these
hparams: :class:`~e2u_models.editing.requests.KeySpec` (requests as rows, key positions),
:class:`~e2u_models.editing.vstar.VStarSettings` (target vectors) and
:class:`~e2u_models.editing.stats.StatsSpec` (second-moment statistics); reading keys is in
:mod:`e2u_models.editing.keys`, the verification in :mod:`e2u_models.editing.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from e2u_models.architectures import LAYERS, MLP_OUT, out_in_weight
from e2u_tasks.errors import E2UError

FACT_TOKENS = ("question_last", "subject_last", "prompt_last")
MERGE_KEYS = ("merged", "members")


@dataclass(frozen=True)
class LocateHParams:
    """Hyperparameters shared by ROME, MEMIT and AlphaEdit (EasyEdit's names where they mean the
    same). ``layers`` wins over ``layer_fractions`` (relative depth in [0, 1], so one file serves
    llama-style models of any depth)."""

    layers: list[int] | None = None
    layer_fractions: list[float] = field(default_factory=lambda: [0.15])
    # Module paths ({} / %d / N = the layer); unset = the architecture family's
    # (e2u_models.architectures): the MLP output projection and the decoder layer.
    rewrite_module_tmp: str | None = field(default=None, metadata=MLP_OUT)
    layer_module_tmp: str | None = field(default=None, metadata=LAYERS)
    fact_token: str = field(default="question_last", metadata={"choices": FACT_TOKENS})
    # [[new tokens, count], ...] of prefixes sampled from the model (EasyEdit's contexts); [] =
    # the bare prompt only.
    context_template_length_params: list[list[int]] = field(default_factory=list)
    v_num_grad_steps: int = field(default=25, metadata={"min": 1})
    v_lr: float = field(default=0.5, metadata={"above": 0})
    v_weight_decay: float = field(default=1e-3, metadata={"min": 0})
    clamp_norm_factor: float = field(default=4.0, metadata={"above": 0})
    kl_factor: float = field(default=0.0625, metadata={"min": 0})
    v_loss_threshold: float = field(default=5e-2, metadata={"above": 0})
    # fast: all requests of a batch together, upper layers only, logits only where the loss reads
    # them; classic: one request at a time with full forward passes (the reference).
    v_mode: str = field(default="fast", metadata={
        "choices": ("fast", "classic"), "message": "hparam {name}={value!r} is not accepted; use fast or classic"})
    # Teach the end-of-turn token after the refusal, so generation stops there.
    target_eos: bool = True
    # Merge this many forget questions (dataset order) into one edit prompt with one target.
    merge: int = field(default=1, metadata={"min": 1, "message": "merge={value} is not accepted; merge counts "
                                                               "questions per edit (1 = no merging, e.g. merge=5)"})
    # Where a merged edit reads its key: "merged" = the merged prompt only (the paper: the key at
    # its end); "members" = the merged prompt and each of its questions asked alone, as contexts
    # (v* must make every one refuse; ROME's key is their mean, MEMIT/AlphaEdit take one key
    # column per question), so the edit sits on the keys the evaluation will see.
    merge_keys: str = field(default="merged", metadata={"choices": MERGE_KEYS})
    stats_corpus: str = "e2u"
    mom2_n_tokens: int = field(default=100_000, metadata={"min": 1})
    mom2_max_length: int = 512
    mom2_dtype: str = field(default="float32", metadata={
        "choices": ("float32", "float64"), "message": "hparam {name}={value!r} is not accepted; use float32 or float64"})
    # Preserved knowledge besides the corpus (AlphaEdit's K0 are keys of facts): the keys at
    # ``fact_token`` of e2u's own questions ("factual", "generic") or a file's (one a line), the
    # questions about the evaluated dataset's entities dropped; their second moment, weighted by
    # ``preserve_weight``, is added to C. None: the corpus alone.
    preserve_questions: str | None = None
    preserve_weight: float = field(default=10.0, metadata={"min": 0})
    # A request whose per-token target NLL after editing stays above this is reported unreached.
    verify_nll: float = field(default=1.0, metadata={"above": 0})

    def validate(self) -> None:
        if self.layers is not None and not self.layers:
            raise E2UError("hparam layers=[] is empty; give layer indices or drop it to use layer_fractions")
        if self.layers is None and (not self.layer_fractions
                                    or any(not 0.0 <= f <= 1.0 for f in self.layer_fractions)):
            raise E2UError(f"hparam layer_fractions={self.layer_fractions} must be numbers in [0, 1]")
        # Choices and ranges of single fields are declared on the fields (checked by
        # e2u_models.hparams); here: rules across fields, and look-ups of corpora and files.
        from e2u_models.editing.stats import corpus_kind

        corpus_kind(self.stats_corpus)
        if self.preserve_questions is not None:
            from e2u_models.question_sets import check_question_source

            check_question_source(self.preserve_questions, "preserve_questions")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or min(pair) < 1:
                raise E2UError("hparam context_template_length_params must be pairs "
                               f"[new tokens, count] of positive ints, got {pair}")

    def resolved_layers(self, n_layers: int) -> list[int]:
        """Edit layers for a model with ``n_layers`` blocks, checked to be in range."""
        if self.layers is None:
            return sorted({round(f * (n_layers - 1)) for f in self.layer_fractions})
        bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
        if bad:
            raise E2UError(f"hparam layers={list(self.layers)} is out of range for this model "
                           f"({n_layers} layers: accepted 0..{n_layers - 1})")
        return sorted(set(self.layers))

    def check_model(self, config) -> None:
        """Checks that need only the model's config (run before its weights are loaded)."""
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is not None:
            self.resolved_layers(int(n_layers))


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def module_named(model, template: str, layer: int, hparam: str) -> torch.nn.Module:
    name = template.format(layer)
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise E2UError(f"module {name!r} does not exist in this {model.config.model_type} model; "
                       f"set hparam {hparam} to this architecture's module path with N for the layer")
    return module


def rewrite_weight(model, hparams: LocateHParams, layer: int) -> torch.Tensor:
    """The rewritten module's weight as [out, in] (a view of a GPT-2 ``Conv1D``'s [in, out]
    parameter): W k is ``weight @ k`` and an update ΔW (out, in) is added to it in place."""
    module = module_named(model, hparams.rewrite_module_tmp, layer, "rewrite_module_tmp")
    if not isinstance(getattr(module, "weight", None), torch.nn.Parameter) or module.weight.dim() != 2:
        raise E2UError(f"hparam rewrite_module_tmp={hparams.rewrite_module_tmp!r} does not name a "
                       "linear layer (need a 2-D weight)")
    return out_in_weight(module)


class OneLayerChoice:
    """For the hparams of single-layer methods (GRACE, WISE): ``layer`` (an index, checked
    against the model) or ``layer_fraction`` (relative depth)."""

    layer: int | None
    layer_fraction: float
    inner_module_tmp: str

    def resolved_layer(self, n_layers: int) -> int:
        if self.layer is None:
            return round(self.layer_fraction * (n_layers - 1))
        if not 0 <= self.layer < n_layers:
            raise E2UError(f"hparam layer={self.layer} is out of range for this model "
                           f"({n_layers} layers: accepted 0..{n_layers - 1})")
        return self.layer

    def check_model(self, config) -> None:
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is not None:
            self.resolved_layer(int(n_layers))

    def edit_site(self, model):
        """(layer, module name, module): the linear layer the method attaches to
        (``inner_module_tmp``), checked to be one."""
        layer = self.resolved_layer(int(model.config.num_hidden_layers))
        module = module_named(model, self.inner_module_tmp, layer, "inner_module_tmp")
        if not isinstance(getattr(module, "weight", None), torch.nn.Parameter) or module.weight.dim() != 2:
            raise E2UError(f"hparam inner_module_tmp={self.inner_module_tmp!r} does not name a linear layer")
        return layer, self.inner_module_tmp.format(layer), module
