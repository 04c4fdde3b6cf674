"""Text classifier: one L2-normalised embedding per name, averaged over prompt templates, with
an on-disk cache keyed by (model, templates, names).

The text encoder comes in as a callable (``encode_text(prompts) -> (B, D)``), so this module
depends on no model library; ``ovseg/encoders`` supplies the callable and the ``model_id``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ovseg.errors import ConfigError, VocabularyError
from ovseg.io import atomic_path, sha256_bytes

CACHE_ENV_VAR = "OVSEG_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/ovseg")
# bump when the stored layout or the computation changes, so old files are not read
_CACHE_FORMAT = "ovseg.text_classifier.v1"
_TENSOR_KEY = "text_classifier"

# directories already warned about as unwritable: one warning per directory per process
_warned_dirs: set[str] = set()

# INFO lines when a classifier is computed (not on a cache hit): a text encoder on a CPU takes
# a minute for 80 templates, which the demos and applications show instead of seeming to hang
logger = logging.getLogger(__name__)


def text_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of cached text classifiers: ``cache_dir`` or ``$OVSEG_CACHE`` or
    ``~/.cache/ovseg``, then ``text/``."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR) or None
    return Path(root if root is not None else DEFAULT_CACHE_DIR).expanduser() / "text"


def text_cache_key(model_id: str, templates: Sequence[str], names: Sequence[str]) -> str:
    """sha256 hex digest identifying one classifier; ``model_id`` names architecture + weights."""
    payload = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "model_id": model_id,
            "templates": list(templates),
            "names": list(names),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return sha256_bytes(payload.encode("utf-8"))


def build_text_classifier(
    encode_text: Callable[[list[str]], Tensor],
    names: Sequence[str],
    templates: Sequence[str],
    *,
    model_id: str,
    batch_size: int = 256,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Embed every name with every template; return the classifier (N_names, D) float32 CPU.

    For each name: fill each template with it, embed the prompts, L2-normalise each embedding,
    average over templates, L2-normalise again. Synonyms are separate names (rows); combine
    their scores with ``max_over_synonyms``.

    Args:
        encode_text: maps a list of B prompts to raw (B, D) embeddings (any device and float
            dtype); called with at most ``batch_size`` prompts at a time, across names.
        names: N_names class names, e.g. ``Vocabulary.names``.
        templates: T format strings with one ``{}`` each, e.g. ``get_templates(...)``.
        model_id: identifies the text encoder's architecture and weights; part of the cache key.
        batch_size: most prompts per ``encode_text`` call.
        cache_dir: cache root (``text/`` is appended); default ``$OVSEG_CACHE`` or
            ``~/.cache/ovseg``.
        use_cache: read and write the on-disk cache. A hit does not call ``encode_text``.

    Returns:
        (N_names, D) float32 on the CPU, rows of unit L2 norm.

    Logs (logger ``ovseg.text.classifier``, INFO) a line before and after computing one, so
    that a caller can show the wait; a cache hit logs nothing.
    """
    names = list(names)
    templates = list(templates)
    _check_inputs(names, templates, batch_size)

    path = text_cache_dir(cache_dir) / f"{text_cache_key(model_id, templates, names)}.safetensors"
    if use_cache:
        cached = _read_cache(path, names)
        if cached is not None:
            return cached

    logger.info(
        "building the text classifier: %d %s x %d prompt %s = %d prompts%s",
        len(names), "name" if len(names) == 1 else "names",
        len(templates), "template" if len(templates) == 1 else "templates",
        len(names) * len(templates), "; cached for the next run" if use_cache else "",
    )
    start = time.perf_counter()
    classifier = _embed_names(encode_text, names, templates, batch_size)
    logger.info("built the text classifier in %.1f s", time.perf_counter() - start)
    if use_cache:
        _write_cache(path, classifier, model_id, templates, names)
    return classifier


def _check_inputs(names: list[str], templates: list[str], batch_size: int) -> None:
    if not names:
        raise VocabularyError("the vocabulary is empty; give at least one class name")
    if not templates:
        raise ConfigError("the list of prompt templates is empty; e.g. use 'openai_imagenet'")
    for template in templates:
        if template.count("{}") != 1:
            raise ConfigError(
                f"prompt template {template!r} must contain '{{}}' exactly once, where the "
                "class name goes"
            )
    if batch_size < 1:
        raise ConfigError(f"text batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def _embed_names(
    encode_text: Callable[[list[str]], Tensor],
    names: list[str],
    templates: list[str],
    batch_size: int,
) -> Tensor:
    """(N_names, D) float32 CPU classifier, computed batch by batch across names.

    no_grad rather than inference_mode: inference tensors cannot be saved for backward, and
    trainable heads multiply their features with this classifier.
    """
    # prompt p belongs to name p // T; summing unit embeddings per name keeps memory at
    # (N_names, D) instead of (N_names * T, D)
    num_templates = len(templates)
    num_prompts = len(names) * num_templates
    sums: Tensor | None = None
    for start in range(0, num_prompts, batch_size):
        stop = min(start + batch_size, num_prompts)
        prompts = [
            templates[p % num_templates].replace("{}", names[p // num_templates])
            for p in range(start, stop)
        ]
        embeddings = encode_text(prompts)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
            raise ValueError(
                f"encode_text returned shape {tuple(embeddings.shape)} for {len(prompts)} "
                f"prompts; expected ({len(prompts)}, D)"
            )
        # summed on the CPU: index_add_ on CUDA uses atomics, whose order (and so the last
        # bits of the result) changes from run to run
        embeddings = F.normalize(embeddings.float(), dim=-1).cpu()
        if sums is None:
            sums = embeddings.new_zeros(len(names), embeddings.shape[1])
        sums.index_add_(0, torch.arange(start, stop) // num_templates, embeddings)
    assert sums is not None  # names and templates are non-empty
    return F.normalize(sums / num_templates, dim=-1).contiguous()


def _read_cache(path: Path, names: list[str]) -> Tensor | None:
    """The cached classifier at ``path``, or None when missing, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            # a copy, so no memory map keeps the file open once this returns
            tensor = file.get_tensor(_TENSOR_KEY).clone()
        stored_names = json.loads(metadata["names"])
    except Exception:
        # a truncated or foreign file is recomputed and overwritten, never fatal
        return None
    if (
        metadata.get("format") != _CACHE_FORMAT
        or stored_names != names
        or tensor.dtype != torch.float32
        or tensor.ndim != 2
        or tensor.shape[0] != len(names)
        or not torch.isfinite(tensor).all()
    ):
        return None
    return tensor


def _write_cache(
    path: Path, classifier: Tensor, model_id: str, templates: list[str], names: list[str]
) -> None:
    """Write atomically (``ovseg.io.atomic_path``); warn once per folder if impossible."""
    metadata = {
        "format": _CACHE_FORMAT,
        "model_id": model_id,
        "templates": json.dumps(templates, ensure_ascii=False),
        "names": json.dumps(names, ensure_ascii=False),
    }
    try:
        # readers in other processes see either no file or a complete one
        with atomic_path(path) as temporary:
            save_file({_TENSOR_KEY: classifier}, str(temporary), metadata=metadata)
    except Exception as error:
        folder = str(path.parent)
        if folder not in _warned_dirs:
            _warned_dirs.add(folder)
            warnings.warn(
                f"cannot write the text-classifier cache in {folder} ({error}); continuing "
                f"without it. Set ${CACHE_ENV_VAR} to a writable folder to cache text "
                "embeddings.",
                stacklevel=3,
            )
