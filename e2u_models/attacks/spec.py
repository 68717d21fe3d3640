"""The ``attack*`` model args as one checked :class:`AttackSpec`.

Every rule is checked here, from the model args alone, so a wrong attack costs no model load:
an unknown attack, bits outside the supported set, ``attack_steps`` < 1, a setting of one attack
given with the other, or attack settings without ``attack=``. (``attack_data=forget_half`` on a
forget set of one row is the split's rule: :mod:`e2u_tasks.splits`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from e2u_tasks.errors import E2UError
from e2u_tasks.splits import parse_bool, parse_int

ATTACKS = ("quantize", "relearn")
# Round-to-nearest grids this attack implements: 8 and 4 bits, the two precisions deployed
# models are commonly quantised to (and the two Zhang et al., ICLR 2025, report).
SUPPORTED_BITS = (8, 4)
RELEARN_DATA = ("forget_half", "retain")
# The settings of each attack, with their defaults.
SETTINGS: Mapping[str, Mapping[str, Any]] = {
    "quantize": {"attack_bits": 8, "attack_group_size": 128},
    "relearn": {"attack_steps": 10, "attack_lr": 1e-4, "attack_data": "forget_half",
                "attack_lora": False},
}
# Every attack model arg and its default (``attack`` itself: no attack).
ATTACK_DEFAULTS: Mapping[str, Any] = {"attack": None, **SETTINGS["quantize"], **SETTINGS["relearn"]}


@dataclass(frozen=True)
class AttackSpec:
    """One attack and its settings (those of the other attack keep their defaults, unused)."""

    name: str
    bits: int = 8
    group_size: int = 128
    steps: int = 10
    lr: float = 1e-4
    data: str = "forget_half"
    lora: bool = False

    def settings(self) -> dict[str, Any]:
        """The settings this attack uses, under their model-arg names (recorded in the results
        and hashed into the attack's cache key)."""
        values = {"attack_bits": self.bits, "attack_group_size": self.group_size,
                  "attack_steps": self.steps, "attack_lr": self.lr, "attack_data": self.data,
                  "attack_lora": self.lora}
        return {"attack": self.name, **{key: values[key] for key in SETTINGS[self.name]}}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _given(args: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in args.items() if value not in (None, "")}


def parse_attack(args: Mapping[str, Any]) -> AttackSpec | None:
    """The attack the model args ask for (None: no attack), or one error line."""
    given = _given({key: args.get(key) for key in ATTACK_DEFAULTS})
    name = str(given.pop("attack", "none")).strip().lower()
    if name in ("none", "false"):
        if given:
            raise E2UError(f"{', '.join(sorted(given))} set without an attack; add "
                           f"attack=quantize (attack_bits, attack_group_size) or attack=relearn "
                           f"(attack_steps, attack_lr, attack_data, attack_lora)")
        return None
    if name not in ATTACKS:
        raise E2UError(f"unknown attack {name!r}; accepted: {', '.join(ATTACKS)} (or none)")
    foreign = sorted(key for key in given if key not in SETTINGS[name])
    if foreign:
        other = next(a for a in ATTACKS if a != name)
        raise E2UError(f"{', '.join(foreign)} belong(s) to attack={other}, not attack={name}; "
                       f"attack={name} takes {', '.join(SETTINGS[name])}")
    values = {**SETTINGS[name], **given}
    if name == "quantize":
        bits = parse_int("attack_bits", values["attack_bits"])
        if bits not in SUPPORTED_BITS:
            raise E2UError(f"attack_bits={bits} is not supported; accepted: "
                           f"{', '.join(map(str, SUPPORTED_BITS))} (round-to-nearest integer grids)")
        group = parse_int("attack_group_size", values["attack_group_size"], 0)
        return AttackSpec(name, bits=bits, group_size=group)
    steps = parse_int("attack_steps", values["attack_steps"])
    if steps < 1:
        raise E2UError(f"attack_steps={steps} is out of range: relearning needs >= 1 optimizer step")
    lr = _positive_float("attack_lr", values["attack_lr"])
    data = str(values["attack_data"]).strip().lower()
    if data not in RELEARN_DATA:
        raise E2UError(f"attack_data={values['attack_data']!r} is not accepted; use one of "
                       f"{', '.join(RELEARN_DATA)}")
    spec = AttackSpec(name, steps=steps, lr=lr, data=data,
                      lora=parse_bool("attack_lora", values["attack_lora"]))
    from e2u_models.attacks.relearn import relearn_hparams

    relearn_hparams(spec.steps, spec.lr, spec.lora)  # attack_lora=true without peft: one line now
    return spec


def _positive_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise E2UError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise E2UError(f"{name}={value} must be a finite number > 0 (e.g. {name}=1e-4)")
    return number
