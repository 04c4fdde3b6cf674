"""COCO Captions JSON (``captions_train2017.json`` format): images and their captions, checked.

The file is a JSON object with ``images`` (``id``, ``file_name``, ``height``, ``width``) and
``annotations`` (``image_id``, ``caption``); the region tools (``tools/mine_region_nouns.py``,
``tools/make_region_labels.py``) read it through :func:`read_coco_captions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovseg.errors import DatasetError


@dataclass
class CaptionedImage:
    """One image of a captions file: its COCO ``images`` entry and captions in file order."""

    id: int
    file_name: str
    height: int
    width: int
    captions: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """The COCO ``images`` entry."""
        return {"id": self.id, "file_name": self.file_name, "height": self.height,
                "width": self.width}


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``, or a one-line :class:`DatasetError` naming it as ``what``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{what} {path} is not valid JSON: {error}") from error


def read_coco_captions(path: str | Path) -> list[CaptionedImage]:
    """The images of a COCO captions file in its ``images`` order, each with its captions.

    Raises:
        DatasetError: a missing or unreadable file, or one that is not in the COCO captions
            format (the message names the first wrong entry).
    """
    data = read_json(path, "captions JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DatasetError(f"captions JSON {path} is not a COCO captions file: expected an "
                           "object with 'images' and 'annotations' lists "
                           "(captions_train2017.json format)")
    images: dict[int, CaptionedImage] = {}
    for index, entry in enumerate(data["images"]):
        try:
            image = CaptionedImage(int(entry["id"]), str(entry["file_name"]),
                                   int(entry["height"]), int(entry["width"]))
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"captions JSON {path}: images[{index}] needs id, file_name, "
                               f"height and width ({error!r})") from error
        images[image.id] = image
    for index, entry in enumerate(data["annotations"]):
        if not isinstance(entry, dict) or "image_id" not in entry \
                or not isinstance(entry.get("caption"), str):
            raise DatasetError(f"captions JSON {path}: annotations[{index}] needs image_id and "
                               "a caption string")
        image = images.get(entry["image_id"])
        if image is None:
            raise DatasetError(f"captions JSON {path}: annotations[{index}] refers to image "
                               f"{entry['image_id']}, which is not in 'images'")
        image.captions.append(entry["caption"])
    return list(images.values())
