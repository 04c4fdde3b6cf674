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
from typing import Any

import torch

from ovseg.errors import WeightsError
from ovseg.io import unreadable_reason


def read_tensor_file(
    path: str | Path,
    *,
    config_key: str | None = None,
    what: str = "checkpoint",
    wrappers: tuple[str, ...] = (),
    expected: str = "",
) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from the first of ``wrappers`` it holds.

    Args:
        path: a ``.safetensors`` file or a torch file (``.pt``, ``.pth``, ``.bin``), read with
            ``torch.load(weights_only=True)`` on the CPU, so no code in a pickle runs.
        config_key: the config key that names the file (said in every error), if any.
        what: what the file should be, e.g. "CLIP-DINOiser heads".
        wrappers: keys whose dict value holds the tensors (``model_state_dict``); entries
            beside the wrapper (an ``epoch`` counter, an optimizer) are ignored.
        expected: what the file should hold, said at the end of a not-a-dict-of-tensors error.

    Raises:
        WeightsError: a missing or unreadable file, or one that holds no flat dict of tensors.
    """
    path = Path(path).expanduser()
    named = f"{what} file {path}" if what != "checkpoint" else f"checkpoint {path}"
    key = f" ({config_key})" if config_key else ""
    if not path.is_file():
        fix = f"; set {config_key} to the file" if config_key else ""
        raise WeightsError(f"{named} does not exist{fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file, or a pickle with code in it
        raise WeightsError(f"cannot read {named}{key}: {unreadable_reason(path, exc)}") from exc
    if isinstance(state, Mapping):
        for wrapper in wrappers:
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    hint = f"; expected {expected}" if expected else ""
    if not isinstance(state, Mapping):
        raise WeightsError(f"{named}{key} holds a {type(state).__name__}, not a dict of "
                           f"tensors{hint}")
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        inside = f" (looked inside {', '.join(wrappers)})" if wrappers else ""
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise WeightsError(f"{named}{key} does not hold a flat dict of tensors{inside}: "
                           f"entries {shown} are not tensors{hint}")
    return {str(k): v for k, v in state.items()}
