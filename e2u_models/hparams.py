"""Hyperparameters resolved in one place: defaults, the method's YAML (or a model preset or a
user file, each possibly on top of a ``base:`` file), then model-arg overrides; every value
type-checked, checked against the rules declared on its field, and traced to where it came from.

A field declares its own choices and range in ``field(metadata=...)``, so a rule sits next to the
value it constrains and one loader checks them all (a class's ``validate()`` keeps the rules that
involve several fields):

- ``choices``: accepted values; ``min`` (>=), ``above`` (>), ``range`` (``"[0, 1)"``: brackets say
  whether the ends are included), ``finite`` (reject inf/nan);
- ``hint``: appended in parentheses to the range message; ``message``: the whole message, a
  format string with ``{name}``, ``{value}`` and ``{choices}`` (for rules stated jointly).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from e2u_models.architectures import fill_from_family
from e2u_tasks.errors import E2UError
from e2u_tasks.splits import parse_int


# Keys of a hparams YAML that describe the file rather than set a hyperparameter: ``match`` (the
# model configs a preset is for) and ``base`` (the shipped file it changes).
PRESET_META_KEYS = ("match", "base")
# A ``match`` key that is not a config field: the dataset the preset is for (the spec's name).
DATASET_MATCH_KEY = "dataset"
MODEL_ARGS = "model args"
DEFAULT = "default"


def hparams_dir() -> Path:
    return Path(str(resources.files("e2u_models.methods").joinpath("hparams")))


def hparams_file(method: str) -> Path:
    """The YAML shipped with a method (``e2u_models/methods/hparams/<method>.yaml``)."""
    return hparams_dir() / f"{method}.yaml"


def preset_files(method: str) -> dict[str, Path]:
    """Model-specific presets of a method: ``hparams/<method>/<name>.yaml``. A method opts into
    model presets by having this folder; without it the config is never consulted."""
    folder = hparams_dir() / method
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def has_presets(method: str) -> bool:
    return bool(preset_files(method))


def preset_for(method: str, config, dataset: str | None = None) -> Path | None:
    """The preset whose ``match`` fits the model's config (config field: value) and, where the
    match names one, the evaluated ``dataset``; so the right values are picked by architecture and
    size, never by the model's name. Of several that fit, the most specific wins: a preset for this
    model *and* dataset (PISTOL's fine-tuned contracts) over the model's general one."""
    fitting = []
    for path in preset_files(method).values():
        match = dict((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("match") or {})
        wanted_dataset = match.pop(DATASET_MATCH_KEY, None)
        if not match or (wanted_dataset is not None and wanted_dataset != dataset):
            continue
        if all(getattr(config, key, None) == value for key, value in match.items()):
            fitting.append((wanted_dataset is not None, len(match), path))
    return max(fitting, key=lambda fit: fit[:2])[2] if fitting else None


def resolve_hparams_path(method: str, hparams: str | None, config=None, dataset: str | None = None) -> str | None:
    """``hparams=`` as given (a file, or the name of a shipped preset), else the preset matching
    the model's config and the dataset, else None (the method's default YAML)."""
    if hparams:
        presets = preset_files(method)
        if hparams in presets:
            return str(presets[hparams])
        if not Path(hparams).expanduser().is_file() and not hparams.endswith((".yaml", ".yml")):
            raise E2UError(f"hparams={hparams!r} is neither a YAML file nor a preset of {method}; "
                           f"presets: {', '.join(presets) or 'none'}")
        return hparams
    if config is not None:
        preset = preset_for(method, config, dataset)
        return str(preset) if preset else None
    return None


def source_name(path: Path | str) -> str:
    """How results name a hparams file: a shipped one as ``hparams/<...>.yaml``, a user's as given."""
    text = str(path).replace("\\", "/")
    shipped = str(hparams_dir()).replace("\\", "/") + "/"
    return "hparams/" + text[len(shipped):] if text.startswith(shipped) else str(path)


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one value (lm-eval turns `layers=2` into the number 2)
        if not isinstance(value, (list, tuple)):
            raise E2UError(f"hparam {name}={value!r} is not a list; give one value, values separated "
                           f"by ';' (e.g. 4;5;6) or a YAML list")
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


def _read_mapping(source: Path, given: bool) -> dict:
    """A hparams YAML as a mapping ({} for a shipped method without a file)."""
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise E2UError(f"hparams file {str(source)!r} cannot be read as YAML ({type(exc).__name__})") from None
    if given and not source.is_file():
        raise E2UError(f"hparams file {str(source)!r} does not exist")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise E2UError(f"hparams file {str(source)!r} must hold a mapping of name: value")
    return raw


def file_layers(method: str, path: str | None) -> list[tuple[Path, dict]]:
    """The files that set values, lowest first: a file's ``base:`` (a shipped method file, e.g.
    ``base: rome`` for ``hparams/rome.yaml``, or a shipped preset, e.g. ``base: gd/smollm2-135m``),
    then the file itself. A preset thus lists only what differs from its base, and each default
    lives in one place."""
    source = Path(path).expanduser() if path else hparams_file(method)
    raw = _read_mapping(source, given=bool(path))
    base = raw.get("base")
    if base is None:
        return [(source, raw)]
    shipped = sorted(p.stem for p in hparams_dir().glob("*.yaml"))
    base_presets = sorted(f"{folder.name}/{p.stem}" for folder in hparams_dir().iterdir() if folder.is_dir()
                          for p in folder.glob("*.yaml"))
    base_file = hparams_dir() / f"{base}.yaml" if base in (*shipped, *base_presets) else None
    if base_file is None or base_file == source:
        raise E2UError(f"hparams file {str(source)!r}: base={base!r} is not accepted; use one of "
                       f"{', '.join(shipped)} or a preset such as {base_presets[0] if base_presets else 'gd/<name>'}")
    return [*file_layers(method, str(base_file)), (source, raw)]


def field_rules(cls: type) -> dict[str, typing.Mapping]:
    """Each field's declared rules; a subclass that only changes a default keeps its base's rules."""
    rules: dict[str, typing.Mapping] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            rules.update({f.name: f.metadata for f in dataclasses.fields(klass) if f.metadata})
    return rules


def _interval(text: str) -> tuple[float, float, bool, bool]:
    low, high = (float(part) for part in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def _broken_rule(value: Any, rule: typing.Mapping) -> str | None:
    """The default message of the first declared rule ``value`` breaks, else None."""
    if "choices" in rule:
        return None if value in rule["choices"] else "hparam {name}={value!r} is not accepted; use one of {choices}"
    if "min" in rule and not value >= rule["min"]:
        return f"hparam {{name}}={{value}} must be >= {rule['min']}"
    if "above" in rule and not value > rule["above"]:
        return f"hparam {{name}}={{value}} must be > {rule['above']}"
    if "range" in rule:
        low, high, closed_low, closed_high = _interval(rule["range"])
        if not ((low <= value if closed_low else low < value) and (value <= high if closed_high else value < high)):
            return f"hparam {{name}}={{value}} must be in {rule['range']}"
    if rule.get("finite") and not math.isfinite(value):  # worded like the field's bound, if any
        bounds = [f"must be >= {rule['min']}" if "min" in rule else None,
                  f"must be > {rule['above']}" if "above" in rule else None,
                  f"must be in {rule['range']}" if "range" in rule else None]
        return "hparam {name}={value} " + next((b for b in reversed(bounds) if b), "is not accepted")
    return None


def check_field(name: str, value: Any, rule: typing.Mapping) -> None:
    """One field's declared rules (``choices``, ``min``, ``above``, ``range``, ``finite``), all of
    them; a rule's ``message`` replaces the default one, a ``hint`` is appended to it."""
    if value is None:  # optional fields: None means "not used"
        return
    broken = _broken_rule(value, rule)
    if broken is None:
        return
    if "hint" in rule and "choices" not in rule:
        broken += f" ({rule['hint']})"
    message = rule.get("message", broken)
    raise E2UError(message.format(name=name, value=value, choices=", ".join(map(str, rule.get("choices") or ()))))


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Resolved hyperparameters: ``values`` (the checked dataclass), ``path`` (the file chosen:
    preset or user file; None = the method's own file) and, per field, where its value came from
    (``sources``: a file as :func:`source_name` writes it, ``"model args"`` or ``"default"``)."""

    values: Any
    path: str | None
    sources: dict[str, str]


def resolve_hparams(cls: type, method: str, hparams: str | None = None,
                    overrides: dict[str, Any] | None = None, config=None, family_config=None,
                    dataset: str | None = None) -> Resolved:
    """The one function that resolves hyperparameters: ``hparams=`` (a file or a preset name), else
    the preset matching ``config`` and ``dataset`` (methods with a preset folder only), else the
    method's file;
    then ``key=value`` overrides; module paths left unset come from ``family_config``'s
    architecture family (:mod:`e2u_models.architectures`). Unknown keys, wrong types and values
    outside a field's rules are one-line errors; then the class's ``validate()`` checks the rules
    across fields."""
    path = resolve_hparams_path(method, hparams, config if has_presets(method) else None, dataset)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    sources = dict.fromkeys(known, DEFAULT)
    layers = [("file " + str(source), source_name(source), raw) for source, raw in file_layers(method, path)]
    for origin, name, mapping in [*layers, (MODEL_ARGS, MODEL_ARGS, overrides or {})]:
        for key, value in mapping.items():
            if origin != MODEL_ARGS and key in PRESET_META_KEYS:
                continue
            if key not in known:
                raise E2UError(f"unknown hparam {key!r} for method {method} (from {origin}); "
                               f"accepted: {', '.join(known) or 'none'}")
            values[key], sources[key] = _coerce(key, value, hints[key]), name
    fill_from_family(cls, values, sources, family_config)
    resolved = cls(**values)
    for name, rule in field_rules(cls).items():
        check_field(name, getattr(resolved, name), rule)
    validate = getattr(resolved, "validate", None)
    if callable(validate):
        validate()
    return Resolved(resolved, path, sources)


def load_hparams(cls: type, method: str, path: str | None = None,
                 overrides: dict[str, Any] | None = None, config=None) -> Any:
    """Just the values of :func:`resolve_hparams` for ``path`` (a file; None = the method's own);
    module paths from ``config``'s architecture family (None: unset until a method fills them
    from the model it edits)."""
    return resolve_hparams(cls, method, path, overrides, family_config=config).values
