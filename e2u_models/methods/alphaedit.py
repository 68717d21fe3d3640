"""AlphaEdit: MEMIT's update projected onto the null space of the preserved knowledge.

Per edit layer, P = U₀U₀ᵀ from the eigenvectors of the key second moment C whose eigenvalue is
below ``nullspace_threshold`` (absolute, as in the paper's code, or relative to the largest
eigenvalue with ``nullspace_rule=relative``); the number of kept dimensions is logged. The update
of a batch is ΔWᵀ = (P (KᵀK + Kpᵀ Kp) + L2·I)⁻¹ P Kᵀ R, where Kpᵀ Kp sums the keys of the batches
already edited in this run (recomputed on the edited weights): it lives in this editor's state,
created per run, never in a module-level global. Everything else is MEMIT's loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from e2u_models.methods import memit
from e2u_models.architectures import with_architecture
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.editing.keys import key_columns, read_at_keys
from e2u_models.editing.locate import LocateHParams, rewrite_weight
from e2u_models.editing.nullspace import check_null_space_hparams, null_space_projector
from e2u_tasks.errors import E2UError

NAME = "alphaedit"
KIND = "editing"
USES_RETAIN = False


@dataclass(frozen=True)
class HyperParams(LocateHParams):
    nullspace_threshold: float = 2e-2
    nullspace_rule: str = "absolute"
    L2: float = field(default=10.0, metadata={"min": 0})
    edit_batch_size: int = field(default=0, metadata={"min": 0, "hint": "0 = one batch"})

    def validate(self) -> None:
        super().validate()
        check_null_space_hparams(self.nullspace_threshold, self.nullspace_rule)


class AlphaEditor:
    """Projectors and the running sum of edited keys of one run."""

    def __init__(self, model, tokenizer, hparams: HyperParams, layers, moments, log):
        self.model, self.tokenizer, self.hparams, self.layers = model, tokenizer, hparams, layers
        self.projectors, self.kept = {}, {}
        for layer in layers:
            # The eigendecomposition runs on the edited module's device (each shard's own GPU).
            device = rewrite_weight(model, hparams, layer).device
            projector, kept = null_space_projector(moments[layer].to(device), hparams.nullspace_threshold,
                                                   hparams.nullspace_rule)
            if kept == 0:
                values = torch.linalg.eigvalsh(moments[layer].double())
                raise E2UError(
                    f"AlphaEdit's null space at layer {layer} is empty at nullspace_threshold="
                    f"{hparams.nullspace_threshold} ({hparams.nullspace_rule}; eigenvalues of C range "
                    f"{values.min().item():.3g}..{values.max().item():.3g}): the edit would change "
                    "nothing; raise nullspace_threshold or use nullspace_rule=relative")
            self.projectors[layer] = projector
            self.kept[layer] = kept
        log("e2u: AlphaEdit null space keeps " + ", ".join(
            f"layer {l}: {self.kept[l]}/{moments[l].shape[0]}" for l in layers) + " dimensions")
        self.edited_keys = {layer: torch.zeros_like(self.projectors[layer]) for layer in layers}

    def solve(self, layer, keys, residual):
        projector = self.projectors[layer].to(keys.device)
        eye = torch.eye(projector.shape[0], dtype=torch.float64, device=keys.device)
        system = projector @ (keys.T @ keys + self.edited_keys[layer].to(keys.device)) + self.hparams.L2 * eye
        return torch.linalg.solve(system, projector @ keys.T @ residual).T

    def remember(self, batch):
        """Add the batch's keys at every edited layer (read in one pass, after the edit)."""
        rows = [row for i, p in enumerate(batch) for row in p.key_rows(i)]
        modules = {layer: self.hparams.rewrite_module_tmp.format(layer) for layer in self.layers}
        read = read_at_keys(self.model, self.tokenizer, rows, {m: "input" for m in modules.values()})
        for layer, module in modules.items():
            keys = key_columns(read[module], batch)[0].double()
            self.edited_keys[layer] = self.edited_keys[layer] + (keys.T @ keys).to(self.edited_keys[layer].device)


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    hparams = with_architecture(hparams, model)

    def make_solver(moments, details):
        editor = AlphaEditor(model, tokenizer, hparams, sorted(moments), moments, env.log)
        details["null_space_dimensions"] = {str(k): v for k, v in editor.kept.items()}
        return editor.solve, editor.remember

    return memit.run(model, tokenizer, forget, hparams, env, seed, NAME, make_solver)
