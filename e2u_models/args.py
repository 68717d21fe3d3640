"""The ``--model e2u`` model args, parsed and checked once into a frozen :class:`E2UArgs`.

Everything that can be wrong in the arguments is found here, before any weights are loaded (a
bad argument costs seconds, not a model load). The hparams are resolved once, after the model's
config is read, so a model preset is applied from the start.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lm_eval.models.huggingface import HFLM

from e2u_models.attacks.spec import ATTACK_DEFAULTS, AttackSpec, parse_attack
from e2u_models.cache import cache_root
from e2u_models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_config, resolve_embedded
from e2u_models.hparams import Resolved, has_presets, resolve_hparams
from e2u_models.methods import get_method
from e2u_models.prompts import parse_chat_template
from e2u_models.saving import check_save_target
from e2u_models.targets import RefusalTargets
from e2u_models.training.finetune import HPARAMS_NAME as FINETUNE_HPARAMS
from e2u_models.training.finetune import FinetuneHParams
from e2u_tasks.data import BENCHMARKS, load_benchmark, load_user_dataset
from e2u_tasks.errors import E2UError
from e2u_tasks.metrics import DEFAULT_LENS_K, DEFAULT_TOP_M
from e2u_tasks.splits import SPEC_KEYS, Splits, SplitSpec, parse_bool, parse_int

# Keyword arguments HFLM forwards to ``from_pretrained`` that users legitimately pass.
FROM_PRETRAINED_ARGS = frozenset({
    "attn_implementation", "low_cpu_mem_usage", "device_map", "quantization_config",
    "load_in_8bit", "load_in_4bit", "token", "torch_dtype", "use_safetensors",
})
HFLM_ARGS = frozenset(name for name, p in inspect.signature(HFLM.__init__).parameters.items()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self")
E2U_ARGS = ("pretrained", "method", "hparams", "seed", "cache_dir", "cache", "chat_template",
            "system_prompt", "top_m", "target", "refusal_file", "targets_file", "export_targets",
            "finetune", "finetune_hparams", "finetune_<recipe key>", "save_edited", "lens", "lens_k",
            *ATTACK_DEFAULTS, *SPEC_KEYS)
FINETUNE_PREFIX = "finetune_"
# e2u's own model args and their defaults (``pretrained`` is E2ULM's first argument).
DEFAULTS: Mapping[str, Any] = {
    "method": "none", "hparams": None, "seed": 0, "cache_dir": None, "chat_template": "auto",
    "system_prompt": None, "top_m": DEFAULT_TOP_M, "target": None, "refusal_file": None,
    "targets_file": None, "export_targets": None, "cache": True, "finetune": None,
    "finetune_hparams": None, "save_edited": None, "lens": True, "lens_k": DEFAULT_LENS_K,
}


@dataclass(frozen=True)
class E2UArgs:
    """Checked model args: what to load, what to do to it and how to evaluate it."""

    pretrained: Any  # what HFLM loads (an embedded model: its cached folder)
    hf_args: Mapping[str, Any]  # the hf model args, passed to HFLM as given
    model_source: Mapping[str, Any]  # provenance of ``pretrained``
    method: ModuleType
    hparams: Resolved
    seed: int
    top_m: int
    chat_template: Any
    system_prompt: str | None
    splits: Splits
    targets: RefusalTargets
    export_targets: str | None
    use_cache: bool
    cache_dir: str | None
    save_edited: str | None
    finetune: str | None = None  # the dataset taught before the method
    finetune_rows: list[dict] | None = None
    finetune_hparams: Resolved | None = None
    attack: AttackSpec | None = None  # run after the method, before evaluation
    lens: bool = True  # the e2u tasks' logit-lens metrics (read by the tasks)
    lens_k: int = DEFAULT_LENS_K


@dataclass(frozen=True)
class _Sorted:
    """The model args by owner: e2u's own, split args, method hparams, recipe keys, hf's, and
    the attack's (given ones only: attack settings without an attack are an error)."""

    own: dict[str, Any]
    split: dict[str, Any]
    overrides: dict[str, Any]
    recipe: dict[str, Any]
    hf: dict[str, Any]
    attack: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_model_args(pretrained: Any = DEFAULT_MODEL, **model_args: Any) -> E2UArgs:
    """All model args checked, in the order their errors are reported; the model's config is
    read (not its weights) to pick the hparams preset and check the hparams against it."""
    method_name = _method_name(model_args.get("method", DEFAULTS["method"]))
    method = get_method(method_name)
    args = sort_model_args(method, method_name, model_args)
    attack_args = args.attack
    own = args.own
    checked: dict[str, Any] = dict(
        seed=parse_int("seed", own["seed"]), top_m=parse_int("top_m", own["top_m"], 1),
        chat_template=parse_chat_template(own["chat_template"]), system_prompt=own["system_prompt"],
        lens=parse_bool("lens", own["lens"]), lens_k=parse_int("lens_k", own["lens_k"], 1),
        attack=parse_attack(attack_args))
    finetune = _finetune_name(own["finetune"])
    finetune_rows = _finetune_rows(finetune, args.split.get("data_dir")) if finetune else None
    if finetune is None and (args.recipe or own["finetune_hparams"]):
        raise E2UError("finetune_* model args need finetune=<dataset> (e.g. finetune=pistol)")
    checked.update(
        # The split's dataset defaults to the finetune dataset; attack=relearn may hold out half
        # of the forget rows.
        splits=SplitSpec.from_args({**args.split, **attack_args, "finetune": finetune}).load(before_known=True),
        targets=RefusalTargets.from_args(own["target"], own["refusal_file"], own["targets_file"]),
        export_targets=_check_export_path(own["export_targets"]),
        use_cache=parse_bool("cache", own["cache"]), cache_dir=own["cache_dir"])
    if method_name != "none" and checked["use_cache"]:
        cache_root(own["cache_dir"])  # a cache that cannot be written fails now, not after the edit
    save_edited = check_save_target(own["save_edited"])
    config = (_load_config(pretrained, args.hf, own["cache_dir"])
              if _needs_config(method, method_name, finetune, pretrained) else None)
    # A model instance (Python API) keeps its given hparams; only its fine-tuning recipe follows
    # its config (as when the recipe was chosen after loading).
    method_config = config if isinstance(pretrained, str) else None
    hparams = resolve_hparams(method.HyperParams, method_name, own["hparams"], args.overrides, method_config,
                              family_config=config, dataset=checked["splits"].spec.dataset)
    check_model = getattr(hparams.values, "check_model", None)
    if callable(check_model) and method_config is not None:
        check_model(method_config)
    recipe = (resolve_hparams(FinetuneHParams, FINETUNE_HPARAMS, own["finetune_hparams"], args.recipe, config,
                              family_config=config)
              if finetune else None)
    # Last: an embedded model's first use converts its weights (tens of seconds).
    pretrained, model_source = _resolve_pretrained(pretrained, own["cache_dir"])
    return E2UArgs(pretrained=pretrained, hf_args=args.hf, model_source=model_source, method=method,
                   hparams=hparams, save_edited=save_edited, finetune=finetune,
                   finetune_rows=finetune_rows, finetune_hparams=recipe, **checked)


def _method_name(method: Any) -> str:
    return "none" if method in (None, "", "None") else str(method).strip().lower()


def _finetune_name(finetune: Any) -> str | None:
    if finetune in (None, "") or str(finetune).strip().lower() in ("none", "false"):
        return None
    return str(finetune).strip()


def sort_model_args(method: ModuleType, method_name: str, model_args: dict[str, Any]) -> _Sorted:
    """Model args by owner; a name no owner accepts is an error listing every accepted name."""
    rest = dict(model_args)
    own = {key: rest.pop(key, default) for key, default in DEFAULTS.items()}
    split = {key: rest.pop(key) for key in SPEC_KEYS if key in rest}
    attack = {key: rest.pop(key) for key in ATTACK_DEFAULTS if key in rest}
    hparam_names = {f.name for f in dataclasses.fields(method.HyperParams)}
    overrides = {key: rest.pop(key) for key in list(rest) if key in hparam_names}
    recipe_names = {f.name for f in dataclasses.fields(FinetuneHParams)}
    recipe = {key[len(FINETUNE_PREFIX):]: rest.pop(key) for key in list(rest)
              if key.startswith(FINETUNE_PREFIX) and key[len(FINETUNE_PREFIX):] in recipe_names}
    unknown = sorted(k for k in rest if k not in HFLM_ARGS and k not in FROM_PRETRAINED_ARGS)
    if unknown:
        raise E2UError(
            f"unknown model arg(s) {', '.join(unknown)} for --model e2u; accepted: "
            f"{', '.join(E2U_ARGS)}, the hparams of method={method_name} "
            f"({', '.join(sorted(hparam_names)) or 'none'}) and the hf model args"
        )
    return _Sorted(own, split, overrides, recipe, rest, attack)


def _finetune_rows(finetune: str, data_dir) -> list[dict]:
    """Rows of the ``finetune=`` dataset (one line listing what is accepted if unknown)."""
    if finetune in BENCHMARKS:
        return load_benchmark(finetune, data_dir)
    try:
        return load_user_dataset(finetune, data_dir)
    except E2UError as exc:
        raise E2UError(f"finetune={finetune!r}: {exc}") from None


def _check_export_path(path: str | None) -> str | None:
    """``export_targets`` must be writable; checked before any model work."""
    if path in (None, ""):
        return None
    target = Path(path).expanduser()
    if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise E2UError(f"export_targets={path!r} is not a writable file path (its folder must "
                       "exist); give e.g. export_targets=targets.jsonl")
    return str(target)


def _resolve_pretrained(pretrained: Any, cache_dir: str | None) -> tuple[Any, dict[str, Any]]:
    """What HFLM loads and its provenance: an embedded model's cached folder, a checked local
    folder, a hub id or a model instance as given."""
    source: dict[str, Any] = {"pretrained": str(pretrained)}
    if isinstance(pretrained, str) and pretrained.lower() in EMBEDDED_MODELS:
        pretrained, embedded = resolve_embedded(pretrained, cache_dir)
        source.update(embedded)
    elif isinstance(pretrained, str):
        _check_local_model(pretrained)
    return pretrained, source


def _check_local_model(pretrained: str) -> None:
    """A ``pretrained`` that names a local path must be a model folder (hub ids pass through)."""
    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise E2UError(
            f"pretrained={pretrained!r} is not a model folder (no config.json there); give a hub "
            f"id, a saved model folder or {', '.join(EMBEDDED_MODELS)}"
        )


def _needs_config(method: ModuleType, method_name: str, finetune: str | None, pretrained: Any) -> bool:
    """The config is read only where it decides something: a preset folder (of the method or of
    the fine-tuning recipe) or a method whose hparams are checked against the model."""
    if not isinstance(pretrained, str):
        return finetune is not None
    return (has_presets(method_name) or callable(getattr(method.HyperParams, "check_model", None))
            or (finetune is not None and has_presets(FINETUNE_HPARAMS)))


def _load_config(pretrained: Any, hf_args: Mapping[str, Any], cache_dir: str | None):
    """The model's config alone (cheap), so hparams can be checked against it before loading."""
    if not isinstance(pretrained, str):
        return getattr(pretrained, "config", None)
    if pretrained.lower() in EMBEDDED_MODELS:
        return embedded_config(pretrained, cache_dir)
    _check_local_model(pretrained)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(pretrained, revision=hf_args.get("revision") or "main",
                                          trust_remote_code=bool(hf_args.get("trust_remote_code")))
    except Exception:  # noqa: BLE001 - HFLM gives the real error when it loads the model
        return None
