"""Type-checked hyperparameters: a method's YAML (or a model preset), then model-arg overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from e2u_tasks.errors import E2UError
from e2u_tasks.splits import parse_int


# Keys of a hparams YAML that describe the file rather than set a hyperparameter.
PRESET_META_KEYS = ("match",)


def hparams_file(method: str) -> Path:
    """The YAML shipped with a method (``e2u_models/methods/hparams/<method>.yaml``)."""
    return Path(str(resources.files("e2u_models.methods").joinpath("hparams", f"{method}.yaml")))


def preset_files(method: str) -> dict[str, Path]:
    """Model-specific presets of a method: ``hparams/<method>/<name>.yaml``."""
    folder = Path(str(resources.files("e2u_models.methods").joinpath("hparams", method)))
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def preset_for(method: str, config) -> Path | None:
    """The preset whose ``match`` (config field: value) fits the model's config, if any; so the
    right values are picked by architecture and size, never by the model's name."""
    for path in preset_files(method).values():
        match = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("match") or {}
        if match and all(getattr(config, key, None) == value for key, value in match.items()):
            return path
    return None


def resolve_hparams_path(method: str, hparams: str | None, config=None) -> str | None:
    """``hparams=`` as given (a file, or the name of a shipped preset), else the preset matching
    the model's config, else None (the method's default YAML)."""
    if hparams:
        presets = preset_files(method)
        if hparams in presets:
            return str(presets[hparams])
        if not Path(hparams).expanduser().is_file() and not hparams.endswith((".yaml", ".yml")):
            raise E2UError(f"hparams={hparams!r} is neither a YAML file nor a preset of {method}; "
                           f"presets: {', '.join(presets) or 'none'}")
        return hparams
    if config is not None:
        preset = preset_for(method, config)
        return str(preset) if preset else None
    return None


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Value converted to the field's annotated type, or one clear error line."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except E2UError as exc:
                errors.append(str(exc))
        raise E2UError(errors[0] if errors else f"hparam {name}={value!r} has the wrong type")
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.replace(";", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise E2UError(f"hparam {name}={value!r} is not a list")
        items = [_coerce(name, v, item_type) for v in value]
        return items if origin is list else tuple(items)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise E2UError(f"hparam {name}={value!r} is not a boolean (true/false)")
    if annotation is int:
        return parse_int(f"hparam {name}", value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise E2UError(f"hparam {name}={value!r} is not a number")
        try:
            return float(value)
        except ValueError:
            raise E2UError(f"hparam {name}={value!r} is not a number") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise E2UError(f"hparam {name}={value!r} is not a string")
        return str(value)
    if isinstance(value, annotation):
        return value
    raise E2UError(f"hparam {name}={value!r} is not a {getattr(annotation, '__name__', annotation)}")


def load_hparams(cls: type, method: str, path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> Any:
    """Hyperparameters: the method's YAML (or ``path``), then ``key=value`` overrides, each
    checked against the dataclass ``cls`` (unknown keys and wrong types are one-line errors)."""
    source = Path(path).expanduser() if path else hparams_file(method)
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise E2UError(f"hparams file {str(source)!r} cannot be read as YAML ({type(exc).__name__})") from None
    if path and not source.is_file():
        raise E2UError(f"hparams file {str(source)!r} does not exist")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise E2UError(f"hparams file {str(source)!r} must hold a mapping of name: value")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for origin, mapping in (("file " + str(source), raw), ("model args", overrides or {})):
        for key, value in mapping.items():
            if origin != "model args" and key in PRESET_META_KEYS:
                continue
            if key not in known:
                raise E2UError(f"unknown hparam {key!r} for method {method} (from {origin}); "
                               f"accepted: {', '.join(known) or 'none'}")
            values[key] = _coerce(key, value, hints[key])
    hparams = cls(**values)
    validate = getattr(hparams, "validate", None)
    if callable(validate):
        validate()
    return hparams
