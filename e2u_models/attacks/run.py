"""Running an attack on the prepared model, or loading its result from the cache.

The attack cache is the edit cache's format under ``<cache>/attacked/<key>/`` (changed weights as
safetensors, the method's adapters as they are after the attack, the report; written atomically,
verified on load). The key hashes the model as the method left it (weights and adapters), the
attack's settings, the relearned rows, the seed, the dtype and the attack code, so the edit itself
still comes from the edit cache and one edit serves every attack.

Only ``relearn`` is cached. ``quantize`` is recomputed: it is a few tensor operations per weight,
about what hashing the model for a key and verifying an entry cost, while its entry would hold
every linear weight of the model (a second copy of the model per method and setting).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from e2u_models.attacks.quantize import quantize_model
from e2u_models.attacks.relearn import relearn, relearn_hparams
from e2u_models.attacks.spec import AttackSpec
from e2u_models.cache import json_sha256
from e2u_models.edit_cache import EditCache, code_sha256, model_sha256
from e2u_models.editing.adapters import adapters_of
from e2u_models.protocol import EditRequest, MethodEnv

FORMAT_VERSION = 1


def state_sha256(model) -> str:
    """Hash of the weights and of the attached adapters' tensors (what an attack starts from)."""
    digest = hashlib.sha256(model_sha256(model).encode())
    for adapter in adapters_of(model):
        digest.update(f"{adapter.kind}:{adapter.module_name}".encode())
        for name, tensor in sorted(adapter.tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_attack(model, tokenizer, spec: AttackSpec, requests: Sequence[EditRequest] | None, *,
               seed: int, env: MethodEnv, cache_dir: str | None, use_cache: bool) -> dict:
    """Apply ``spec`` to ``model`` in place (``requests``: the rows relearned); its report."""
    import torch

    started = time.perf_counter()
    summary = {**spec.settings(), "rows": [r.index for r in requests] if requests is not None else None}
    cache = EditCache(cache_dir, log=env.log, folder="attacked") if use_cache and spec.name == "relearn" else None
    if cache is not None:
        inputs = {"model": state_sha256(model), "attack": spec.settings(), "seed": seed,
                  "rows": [[r.index, r.prompt, r.answer] for r in requests or ()],
                  "dtype": str(model.dtype), "code": code_sha256(__name__), "format": FORMAT_VERSION}
        key = json_sha256(inputs)
        attached = list(adapters_of(model))
        for adapter in attached:  # the entry holds the adapters as the attack left them
            adapter.detach(model)
        cached = cache.load(key, model)
        if cached is not None:
            seconds = time.perf_counter() - started
            env.log(f"e2u: attack={spec.name} loaded from the cache in {seconds:.1f} s")
            model.eval()
            return {**cached, "cache": {"hit": True, "key": key}, "seconds": round(seconds, 3)}
        for adapter in attached:
            adapter.attach(model)
    env.log(f"e2u: attack={spec.name} {summary}")
    random_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if spec.name == "quantize":
            details = quantize_model(model, spec.bits, spec.group_size)
        else:
            details = relearn(model, tokenizer, requests, relearn_hparams(spec.steps, spec.lr, spec.lora),
                              seed=seed, env=env)
            details["parameters"] = details.pop("changed_parameters")
    finally:
        torch.random.set_rng_state(random_state)
    changed = details.pop("parameters")
    seconds = time.perf_counter() - started
    report = {**summary, "details": {**details, "changed_parameters": len(changed)},
              "seconds_when_computed": round(seconds, 3)}
    env.log(f"e2u: attack={spec.name} done in {seconds:.1f} s ({len(changed)} weights changed)")
    model.eval()
    if cache is not None:
        cache.save(key, model, changed, report, inputs)
    return {**report, "cache": {"hit": False, "key": key} if cache is not None else None,
            "seconds": round(seconds, 3)}
