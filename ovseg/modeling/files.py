"""Reading the released files of trained heads: nested torch dicts or safetensors, strictly.

The authors' files wrap their tensors (CLIP-DINOiser's ``last.pt``: ``{'epoch',
'model_state_dict'}``; FOUND's ``decoder_weights.pt``: ``{'decoder': {...}}``), which
:func:`ovseg.io.load_state_dict_file` does not unwrap; this reader takes the wrapper key to
look in. Files are read with ``torch.load(weights_only=True)`` (no code is unpickled) or
safetensors, mapped to the CPU. Every error is one line naming the file and the config key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ovseg.errors import WeightsError
from ovseg.io import unreadable_reason


def read_tensor_file(
    path: str | Path, *, config_key: str, what: str, wrappers: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from the first of ``wrappers`` it holds.

    Args:
        path: a ``.safetensors`` file or a torch file (``.pt``, ``.pth``, ``.bin``).
        config_key: the config key that names the file (said in every error).
        what: what the file should be, e.g. "CLIP-DINOiser heads".
        wrappers: keys whose dict value holds the tensors (``model_state_dict``); entries
            beside the wrapper (an ``epoch`` counter) are ignored.

    Raises:
        WeightsError: a missing or unreadable file, or one that holds no dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what} file {path} does not exist; set {config_key} to the file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file, or a pickle with code in it
        raise WeightsError(
            f"cannot read {what} file {path} ({config_key}): {unreadable_reason(path, exc)}"
        ) from exc
    if isinstance(state, Mapping):
        for key in wrappers:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise WeightsError(f"{what} file {path} ({config_key}) does not hold a dict of tensors")
    return dict(state)
