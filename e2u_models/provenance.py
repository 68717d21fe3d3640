"""The run card: what was run on which model, with which values from where, at what cost.

It becomes ``config.e2u`` of lm-eval's results JSON (reports and leaderboards read its keys, so
keys are only ever added) and the metadata of a model written by ``save_edited``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from e2u_models.cache import json_sha256
from e2u_models.protocol import uses_retain
from e2u_models.editing.verify import targets_reached
from e2u_models.hparams import Resolved, hparams_file
from e2u_models.prompts import PromptFormat
from e2u_models.training.finetune import HPARAMS_NAME as FINETUNE_HPARAMS

if TYPE_CHECKING:
    from e2u_models.args import E2UArgs
    from e2u_models.pipeline import Prepared

# How ``hparams_source`` names a shipped file: from the package folder on.
SHIPPED_MARKER = "e2u_models/methods/hparams/"


def resource_usage(started: float, device: Any = None) -> dict[str, Any]:
    """Run-card cost figures of a phase: wall seconds since ``started`` and peak memory so far.

    ``peak_rss_bytes`` is the process's peak resident memory up to now (Unix ``getrusage``; absent
    elsewhere); on CUDA, ``cuda_peak_bytes`` is the phase's peak allocation (the counter is reset,
    so the next phase starts from zero).
    """
    usage: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 3)}
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        usage["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    except ImportError:  # Windows
        pass
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        usage["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    return usage


def package_versions() -> dict[str, str]:
    versions = {}
    for dist in ("e2u", "lm_eval", "torch", "transformers", "tokenizers", "datasets", "rouge_score"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def cpu_name() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_fingerprint(device: Any, dtype: Any) -> dict[str, Any]:
    """What a number can depend on besides the inputs: the device and its name, the dtype, the
    software (the tokenizer library included: it decides the token ids), the CPU kernels torch
    dispatches to (``cpu_capability``: AVX2 and AVX-512 sum in different orders), the thread
    count and the determinism flag. Two runs with equal fingerprints are expected to agree to
    float noise; across fingerprints only statistically."""
    kind = torch.device(device).type if device is not None else "cpu"
    name = (torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" and torch.cuda.is_available()
            else cpu_name())
    versions = package_versions()
    return {
        "device_type": kind, "device_name": name, "dtype": str(dtype).replace("torch.", ""),
        "torch": versions["torch"], "transformers": versions["transformers"],
        "lm_eval": versions["lm_eval"], "e2u": versions["e2u"], "tokenizers": versions["tokenizers"],
        "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def file_name(resolved: Resolved, default_name: str) -> str:
    """The hparams file used: a shipped file as its package path, a user file as given."""
    source = resolved.path or str(hparams_file(default_name))
    return source[source.index(SHIPPED_MARKER):] if SHIPPED_MARKER in source.replace("\\", "/") else source


def finetune_info(args: E2UArgs, report: dict | None) -> dict | None:
    if report is None:
        return None
    return {**report, "recipe_source": file_name(args.finetune_hparams, FINETUNE_HPARAMS),
            "recipe_sources": dict(args.finetune_hparams.sources)}


def e2u_info(args: E2UArgs, prepared: Prepared, prompt_format: PromptFormat,
             model_source: Mapping[str, Any], run_card: dict, fingerprint: dict | None = None) -> dict:
    """The ``config.e2u`` block of the results."""
    hparams = dataclasses.asdict(args.hparams.values)
    targets = prepared.targets
    forget_targets = ([targets.for_row(i, args.seed) for i in args.splits.forget]
                      if prepared.has_targets() else None)
    return {
        "method": args.method.NAME,
        "method_kind": args.method.KIND,
        "uses_retain_split": uses_retain(args.method, args.hparams.values),
        "hparams": hparams,
        "hparams_sha256": json_sha256(hparams),
        "hparams_source": file_name(args.hparams, args.method.NAME),
        # Per hparam: "hparams/<file>.yaml", a user file as given, "model args" or "default".
        "hparams_sources": dict(args.hparams.sources),
        "seed": args.seed,
        "top_m": args.top_m,
        "split": {**args.splits.describe(), **({"known_cache": prepared.known_report}
                                               if prepared.known_report else {})},
        "targets": {**targets.describe(), **prepared.target_report,
                    "sha256": json_sha256(forget_targets)},
        "prompt": prompt_format.describe(),
        "model_source": dict(model_source),
        "method_report": prepared.method_report.as_dict(),
        "finetune": finetune_info(args, prepared.finetune_report),
        # attack=: name, settings, what it changed (GRACE/WISE state included), cache key and hit
        "attack": prepared.attack_report,
        "packages": package_versions(),
        "model_sha256": prepared.model_sha256,
        "run_card": {**run_card, **({"targets": reach} if (reach := targets_reached(
            prepared.method_report.as_dict())) else {})},
        "fingerprint": fingerprint,
    }
