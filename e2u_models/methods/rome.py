"""ROME: a rank-one update of one MLP output projection per request, applied sequentially.

For request i with key k* (the projection's input at the key token), mean key k̄ over the
contexts and target value v* (:mod:`e2u_models.editing.vstar`, optimised on the already-edited
model), the update is ΔW = r uᵀ with u = C⁻¹k̄/‖C⁻¹k̄‖ (``mom2_adjustment``; else k̄/‖k̄‖) and
r = δ/(k̄·u), δ = v* − W k* (v* optimised at the bare prompt's key k*), so W' k̄ = W k̄ + δ:
the paper's k* is the key averaged over the contexts; without contexts k̄ = k* and W' k* = v*
exactly. C is the uncentred second moment of the
projection's input (:mod:`e2u_models.editing.stats`). Requests are edited one after another on the
edited weights, without rollback (the protocol of the paper).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from e2u_models.architectures import engine_record, with_architecture
from e2u_models.protocol import EditRequest, MethodEnv, MethodReport
from e2u_models.editing.keys import mean_key_per_request
from e2u_models.editing.locate import LocateHParams, num_layers, rewrite_weight
from e2u_models.editing.requests import KeySpec, merge_requests, prepare_requests
from e2u_models.editing.stats import StatsSpec, statistics_for
from e2u_models.editing.verify import check_finite, target_nll, verification
from e2u_models.editing.vstar import VStarSettings, optimise_targets
from e2u_models.snapshot import restored_on_failure
from e2u_tasks.errors import E2UError

NAME = "rome"
KIND = "editing"
USES_RETAIN = False


@dataclass(frozen=True)
class HyperParams(LocateHParams):
    mom2_adjustment: bool = True

    def validate(self) -> None:
        super().validate()
        if self.layers is not None and len(self.layers) != 1 or self.layers is None and len(self.layer_fractions) != 1:
            raise E2UError("ROME edits exactly one layer; give hparam layers=[<one index>]")


def apply(model, tokenizer, forget: list[EditRequest], retain, hparams: HyperParams, *,
          seed: int = 0, env: MethodEnv) -> MethodReport:
    hparams = with_architecture(hparams, model)
    (layer,) = hparams.resolved_layers(num_layers(model))
    module = hparams.rewrite_module_tmp.format(layer)
    weight = rewrite_weight(model, hparams, layer)
    requests = merge_requests(forget, hparams.merge, env.render)
    prepared = prepare_requests(model, tokenizer, requests, KeySpec.of(hparams), env, seed, forget)
    details: dict = {"layer": layer, "requests": len(prepared), "protocol": "sequential",
                     "architecture": engine_record(model, module, module, hparams.layer_module_tmp.format(layer),
                                                   hparams.v_mode == "fast", env.log)}
    inverse_moment = None
    if hparams.mom2_adjustment:
        started = time.perf_counter()
        moments, details["statistics"] = statistics_for(model, tokenizer, StatsSpec.of(hparams), [layer], env)
        details["statistics"]["seconds"] = round(time.perf_counter() - started, 2)
        inverse_moment = moments[layer].to(weight.device, torch.float64)
    before = target_nll(model, tokenizer, prepared)
    v_seconds, losses, modes = 0.0, [], set()
    weights = {module + ".weight": weight}
    settings = VStarSettings.of(hparams)
    with restored_on_failure(weights) as snapshot:
        for number, request in enumerate(prepared):
            mean_key = mean_key_per_request(model, tokenizer, [request], module)[0].double()
            u = torch.linalg.solve(inverse_moment, mean_key) if inverse_moment is not None else mean_key
            u = u / u.norm()
            result = optimise_targets(model, tokenizer, [request], settings, layer, module,
                                      desc=f"ROME v* {number + 1}/{len(prepared)}")
            v_seconds += result.seconds
            losses.append(result.losses[0])
            modes.add(result.mode)
            right = result.deltas[0].double() / torch.dot(mean_key, u)
            update = torch.outer(right, u)
            check_finite(update, f"ROME update of request row {request.request.index}")
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
        changes = snapshot.change_norms(weights)
    after = target_nll(model, tokenizer, prepared)
    details["v_star"] = {"seconds": round(v_seconds, 2), "mode": "/".join(sorted(modes)) or hparams.v_mode,
                         "final_losses": [round(x, 4) for x in losses]}
    details["verification"] = verification(before, after, prepared, hparams.verify_nll, changes, env.log)
    return MethodReport(method=NAME, changed_parameters=list(weights), details=details)
