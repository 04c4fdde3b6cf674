"""Weights resolution: one spec string per encoder, loaded safely and checked against the model.

A spec is one of
- ``"random"``: keep the random initialisation (tests, benchmarks of time and memory);
- a local file ending in ``.pt``, ``.pth``, ``.bin`` or ``.safetensors``;
- ``"hf-hub:org/name"``: a Hugging Face hub repository (needs network or a filled HF cache);
- anything else: a library's own pretrained tag (open_clip: ``openai``, ``laion2b_s32b_b79k``;
  timm: ``timm`` = the default pretrained weights of the timm model name).

Files are read with ``torch.load(weights_only=True)`` or safetensors, never by unpickling code
(``ovseg.io.load_state_dict_file``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ovseg.errors import WeightsError

# state-dict files are read in ovseg.io (the bottom layer: the engine reads them too); these
# names stay importable from here, where the encoders look for everything about weights
from ovseg.io import describe_mismatch, load_state_dict_file

__all__ = [
    "WEIGHT_FILE_SUFFIXES",
    "WeightsSpec",
    "describe_mismatch",
    "load_into",
    "load_state_dict_file",
    "offline_hint",
    "parse_weights_spec",
    "save_state_dict_file",
    "seeded_init",
]

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed weights spec. ``kind`` is random | file | hf_hub | tag."""

    kind: str
    value: str

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


def parse_weights_spec(spec: str) -> WeightsSpec:
    """Classify a weights spec string (see the module docstring)."""
    spec = (spec or "").strip()
    if spec in ("", "random", "none"):
        return WeightsSpec("random", "")
    if spec.startswith("hf-hub:"):
        return WeightsSpec("hf_hub", spec[len("hf-hub:"):])
    if spec.endswith(WEIGHT_FILE_SUFFIXES) or "/" in spec or spec.startswith("."):
        return WeightsSpec("file", str(Path(spec).expanduser()))
    return WeightsSpec("tag", spec)


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Build a model inside this block and its random initialisation is the same every time,
    so ``random`` weights (tests, benchmarks, caches keyed by weights) are reproducible; the
    caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_state_dict_file(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as ``.safetensors`` or a torch file, chosen by the suffix."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    expected: str,
    strip_prefix: str = "",
) -> None:
    """Load ``state`` strictly into ``module``; any mismatch is one clear :class:`WeightsError`.

    Args:
        source: the file or tag the weights came from (named in the error).
        expected: what the weights should be, e.g. "an open_clip ViT-B-16 state dict".
        strip_prefix: a key prefix to remove first (e.g. "module." from DDP checkpoints).
    """
    if strip_prefix:
        state = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v
                 for k, v in state.items()}
    own = module.state_dict()
    problems = describe_mismatch(own, own, state)
    if problems:
        raise WeightsError(
            f"weights {source} do not fit: expected {expected}; " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def offline_hint(what: str, config_key: str) -> str:
    """The sentence every 'cannot fetch' error ends with."""
    return (
        f"{what} could not be fetched (no network?). Download the checkpoint on a machine with "
        f"network access, copy it here and set `{config_key} /path/to/checkpoint` "
        "(.pt/.pth/.bin/.safetensors)"
    )
