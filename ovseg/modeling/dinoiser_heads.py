"""CLIP-DINOiser's two heads on CLIP's block-9 ln_2 output, and their files (clip_dinoiser.md).

- ``correlation`` (the authors' ``obj_proj``): Conv2d in_dim -> proj_dim (768 -> 256), 3x3,
  padding 1 with replicate padding, with bias, no activation. Its output, L2-normalised per
  patch, gives the patch-to-patch cosines that pool the MaskCLIP features (:func:`patch_cosines`).
- ``background`` (``bkg_decoder``): Conv2d in_dim -> 1, 1x1, with bias, on the per-patch
  L2-normalised input; a logit whose sigmoid is the foreground (object) saliency.

Files. Our heads file is a safetensors state dict with the keys of the method's own state dict
(``heads.correlation.weight``, ``heads.correlation.bias``, ``heads.background.weight``,
``heads.background.bias``), so the same file loads as ``model.clip_dinoiser.heads`` and as the
engine's ``model.weights``; a JSON sidecar beside it (same stem) records the sizes and the
source. :func:`load_heads_state` reads it strictly, and reads the authors' ``last.pt``
(``{'epoch', 'model_state_dict'}`` with ``obj_proj.*`` and ``bkg_decoder.*``, a ``module.``
prefix allowed) the same way; :func:`convert_reference_heads` writes the latter as the former::

    python -m ovseg.modeling.dinoiser_heads last.pt clip_dinoiser_heads.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.errors import OvsegError, WeightsError
from ovseg.io import atomic_path, atomic_write_text, describe_mismatch, sha256_file
from ovseg.modeling.files import read_tensor_file

HEADS_CONFIG_KEY = "model.clip_dinoiser.heads"
# the heads' key prefix in the method's state dict (ClipDinoiser.heads)
HEADS_PREFIX = "heads."
# the authors' module names -> ours
REFERENCE_NAMES = {"obj_proj.": "correlation.", "bkg_decoder.": "background."}
REFERENCE_KEYS = ("obj_proj.weight", "obj_proj.bias", "bkg_decoder.weight", "bkg_decoder.bias")
# the frozen encoder's keys a checkpoint may carry beside the heads (solver.checkpoint_frozen)
FROZEN_PREFIX = "clip."
FILE_FORMAT = "ovseg.clip_dinoiser.heads"
_HOW_TO_GET = ("train them with tools/train_net.py, or convert the authors' last.pt with "
               "`python -m ovseg.modeling.dinoiser_heads last.pt heads.safetensors`")


class DinoiserHeads(nn.Module):
    """The correlation and background heads.

    Args:
        in_dim: the CLIP transformer width (768 for ViT-B/16).
        proj_dim: the correlation projection's width (256).
    """

    def __init__(self, in_dim: int = 768, proj_dim: int = 256):
        super().__init__()
        self.in_dim = in_dim
        self.proj_dim = proj_dim
        self.correlation = nn.Conv2d(in_dim, proj_dim, kernel_size=3, padding=1,
                                     padding_mode="replicate", bias=True)
        self.background = nn.Conv2d(in_dim, 1, kernel_size=1, bias=True)

    def correlation_features(self, ln2: Tensor) -> Tensor:
        """(B, in_dim, h, w) ln_2 features -> (B, proj_dim, h, w), not normalised."""
        return self.correlation(ln2.to(self.correlation.weight.dtype))

    def background_logits(self, ln2: Tensor) -> Tensor:
        """(B, in_dim, h, w) ln_2 features -> (B, 1, h, w) logits of the per-patch
        L2-normalised input; sigmoid = foreground saliency."""
        x = F.normalize(ln2.to(self.background.weight.dtype), dim=1)
        return self.background(x)

    def forward(self, ln2: Tensor) -> tuple[Tensor, Tensor]:
        """(B, in_dim, h, w) -> (correlation features (B, proj_dim, h, w), background logits
        (B, 1, h, w))."""
        return self.correlation_features(ln2), self.background_logits(ln2)

    def load_file(self, path: str | Path, config_key: str = HEADS_CONFIG_KEY) -> None:
        """Load a heads file strictly (:func:`load_heads_state`) into these heads."""
        state = load_heads_state(path, self.in_dim, self.proj_dim, config_key)
        own = self.state_dict()
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def patch_cosines(correlation_features: Tensor) -> Tensor:
    """(B, P, h, w) correlation-head output -> (B, N, N) float32 cosines between its patches
    (N = h * w, row-major), each patch L2-normalised; the diagonal is 1."""
    features = F.normalize(correlation_features.float().flatten(2), dim=1)
    return features.transpose(1, 2) @ features


# --------------------------------------------------------------------------- files


def _rename(key: str) -> str:
    """A file's key -> the heads' own name: ``module.`` and ``heads.`` prefixes dropped, the
    authors' module names mapped to ours."""
    if key.startswith("module."):
        key = key[len("module."):]
    if key.startswith(HEADS_PREFIX):
        key = key[len(HEADS_PREFIX):]
    for theirs, ours in REFERENCE_NAMES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def heads_state_from(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Any accepted layout -> (the heads' state dict, problems). The frozen CLIP's keys of a
    checkpoint made with ``solver.checkpoint_frozen`` are left out; a key that two file keys
    map to is a problem."""
    out: dict[str, Tensor] = {}
    duplicates = []
    for key, value in state.items():
        bare = key[len("module."):] if key.startswith("module.") else key
        if bare.startswith(FROZEN_PREFIX):
            continue
        name = _rename(key)
        if name in out:
            duplicates.append(key)
        out[name] = value
    return out, ([f"keys mapping to the same head parameter: {', '.join(duplicates)}"]
                 if duplicates else [])


def load_heads_state(
    path: str | Path, in_dim: int, proj_dim: int, config_key: str = HEADS_CONFIG_KEY
) -> dict[str, Tensor]:
    """The state dict of :class:`DinoiserHeads` (``correlation.*``, ``background.*``) from a
    heads file: ours (safetensors, ``heads.*`` keys), a training checkpoint's ``.safetensors``,
    or the authors' ``last.pt``. Strict: every key present, none more, every shape right.

    Raises:
        WeightsError: one line naming the file, the missing / unexpected / misshapen keys and
            ``config_key``.
    """
    raw = read_tensor_file(path, config_key=config_key, what="CLIP-DINOiser heads",
                           wrappers=("model_state_dict", "state_dict", "model"))
    state, problems = heads_state_from(raw)
    with torch.device("meta"):
        own = DinoiserHeads(in_dim, proj_dim).state_dict()
    problems += describe_mismatch(own, own, state)
    if problems:
        raise WeightsError(
            f"heads file {Path(path).expanduser()} does not fit CLIP-DINOiser heads for a CLIP "
            f"of width {in_dim} (correlation {proj_dim}x{in_dim}x3x3, background "
            f"1x{in_dim}x1x1): " + "; ".join(problems) +
            f"; set {config_key} to heads made for this CLIP: {_HOW_TO_GET}"
        )
    return {key: state[key] for key in own}


def convert_reference_heads(
    source: str | Path, destination: str | Path, in_dim: int | None = None
) -> Path:
    """Convert the authors' ``last.pt`` to our heads file, strictly.

    The source must hold exactly the four tensors ``obj_proj.weight`` (P, D, 3, 3),
    ``obj_proj.bias`` (P,), ``bkg_decoder.weight`` (1, D, 1, 1), ``bkg_decoder.bias`` (1,)
    (under ``model_state_dict`` or not, a ``module.`` prefix allowed). Writes ``destination``
    (``.safetensors``, keys ``heads.*``) and a JSON sidecar with the same stem, both atomically.

    Args:
        in_dim: the CLIP width the heads must fit (768 for ViT-B/16); None = the file's.

    Returns:
        the destination path.

    Raises:
        WeightsError: a missing or wrong file (the keys are listed).
    """
    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    if destination.suffix != ".safetensors":
        raise WeightsError(f"the converted heads file must end in .safetensors, got {destination}")
    raw = read_tensor_file(source, config_key="the SOURCE argument", what="CLIP-DINOiser "
                           "last.pt", wrappers=("model_state_dict",))
    stripped = {k[len("module."):] if k.startswith("module.") else k: v for k, v in raw.items()}
    missing = [key for key in REFERENCE_KEYS if key not in stripped]
    extra = sorted(set(stripped) - set(REFERENCE_KEYS))
    weight = stripped.get("obj_proj.weight")
    if missing or extra or weight is None or weight.dim() != 4:
        parts = [f"missing keys: {', '.join(missing)}"] if missing else []
        parts += [f"unexpected keys: {', '.join(extra)}"] if extra else []
        if weight is not None and weight.dim() != 4:
            parts.append(f"obj_proj.weight has shape {tuple(weight.shape)}, expected (P, D, 3, 3)")
        raise WeightsError(
            f"{source} is not the authors' CLIP-DINOiser last.pt: " + "; ".join(parts) +
            f"; expected exactly {', '.join(REFERENCE_KEYS)}"
        )
    proj_dim, file_in_dim = int(weight.shape[0]), int(weight.shape[1])
    state, problems = heads_state_from(stripped)
    with torch.device("meta"):
        own = DinoiserHeads(in_dim or file_in_dim, proj_dim).state_dict()
    problems += describe_mismatch(own, own, state)
    if problems:
        raise WeightsError(
            f"{source} does not fit CLIP-DINOiser heads for a CLIP of width "
            f"{in_dim or file_in_dim}: " + "; ".join(problems)
        )
    tensors = {HEADS_PREFIX + key: state[key].detach().float().contiguous() for key in own}
    sizes = {"in_dim": in_dim or file_in_dim, "proj_dim": proj_dim}
    from safetensors.torch import save_file

    with atomic_path(destination) as temporary:
        save_file(tensors, str(temporary),
                  metadata={"format": FILE_FORMAT, **{k: str(v) for k, v in sizes.items()}})
    sidecar = {"format": FILE_FORMAT, **sizes, "keys": sorted(tensors),
               "source": str(source), "source_sha256": sha256_file(source)}
    atomic_write_text(destination.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    return destination


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ovseg.modeling.dinoiser_heads SOURCE DESTINATION``: convert the authors'
    last.pt; errors are one line."""
    parser = argparse.ArgumentParser(description="Convert CLIP-DINOiser's last.pt to ovseg's "
                                     "heads file (safetensors + JSON sidecar).")
    parser.add_argument("source", help="the authors' checkpoints/last.pt")
    parser.add_argument("destination", help="the heads file to write (.safetensors)")
    parser.add_argument("--in-dim", type=int, default=None,
                        help="the CLIP width the heads must fit (768 for ViT-B/16)")
    args = parser.parse_args(argv)
    try:
        path = convert_reference_heads(args.source, args.destination, args.in_dim)
    except OvsegError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path}; use it as {HEADS_CONFIG_KEY} {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover - a command line
    sys.exit(main())
