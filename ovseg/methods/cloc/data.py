"""CLOC's region data: COCO-format JSON files (pycocotools) of boxes with region text.

A region set is a COCO JSON (``images``, ``annotations`` with ``bbox`` x,y,w,h in pixels and a
``category_id``, optionally a ``caption`` per annotation: the region text) with a folder of its
images, optionally a COCO captions JSON of the same images (image-level text for L_CLIP; an
image's own ``caption`` field works too). Built-in sets under ``datasets.root``:
``coco_regions_train`` (COCO train2017 with its captions), ``coco_regions`` (val2017, 80
classes) and ``lvis_regions`` (LVIS v1 val, 1203 classes, images under ``coco/``). More sets,
or other paths for these, come from ``model.cloc.region_sets``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg.data.image_io import read_image
from ovseg.errors import ConfigError, DatasetError

BUILTIN_REGION_SETS: dict[str, dict[str, str]] = {
    "coco_regions_train": {
        "annotations": "coco/annotations/instances_train2017.json",
        "image_dir": "coco/train2017", "captions": "coco/annotations/captions_train2017.json",
        "task": "recognition"},
    "coco_regions": {"annotations": "coco/annotations/instances_val2017.json",
                     "image_dir": "coco/val2017", "captions": "", "task": "recognition"},
    "lvis_regions": {"annotations": "lvis/lvis_v1_val.json", "image_dir": "coco",
                     "captions": "", "task": "recognition"},
}


@dataclass
class RegionSet:
    """A resolved region set: absolute paths and its task."""

    name: str
    annotations: Path
    image_dir: Path
    captions: Path | None
    task: str


def resolve_region_set(name: str, settings, root: str | None) -> RegionSet:
    """The region set ``name``: from ``model.cloc.region_sets``, else a built-in one.

    Raises:
        ConfigError: an unknown name.
    """
    from ovseg.data.catalog import datasets_root

    entry = None
    for candidate in settings.region_sets:
        if candidate.name == name:
            entry = {"annotations": candidate.annotations, "image_dir": candidate.image_dir,
                     "captions": candidate.captions, "task": candidate.task}
    if entry is None:
        entry = BUILTIN_REGION_SETS.get(name)
    if entry is None:
        known = sorted({*BUILTIN_REGION_SETS, *(e.name for e in settings.region_sets)})
        raise ConfigError(f"unknown CLOC region set {name!r}; one of {known}, or add it to "
                          "model.cloc.region_sets (name, annotations, image_dir)")
    base = datasets_root(root or None)

    def where(path: str) -> Path:
        path_ = Path(path).expanduser()
        return path_ if path_.is_absolute() else base / path_

    captions = where(entry["captions"]) if entry["captions"] else None
    return RegionSet(name, where(entry["annotations"]), where(entry["image_dir"]), captions,
                     entry["task"])


def load_coco(path: Path):
    """A pycocotools COCO of ``path`` (its progress prints silenced).

    Raises:
        DatasetError: a missing or unreadable file.
    """
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DatasetError(f"region annotation file {path} does not exist; see "
                           "datasets/README.md, or set model.cloc.region_sets")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except Exception as exc:
        raise DatasetError(f"cannot read COCO JSON {path}: {exc}") from exc


def category_names(coco) -> tuple[list[int], list[str]]:
    """Category ids in ascending order and their names, underscores as spaces (LVIS)."""
    ids = sorted(coco.getCatIds())
    return ids, [coco.loadCats(i)[0]["name"].replace("_", " ") for i in ids]


def image_path(image_dir: Path, info: dict[str, Any]) -> Path:
    """An image's file: ``file_name``, else the last two parts of ``coco_url`` (LVIS)."""
    if info.get("file_name"):
        return image_dir / info["file_name"]
    if info.get("coco_url"):
        return image_dir / Path(*Path(info["coco_url"]).parts[-2:])
    raise DatasetError(f"image {info.get('id')} has neither file_name nor coco_url")


def region_text(annotation: dict[str, Any], names: dict[int, str], mode: str) -> str:
    """The annotation's region text: its ``caption`` (mode caption), else its category name."""
    caption = annotation.get("caption") if mode == "caption" else None
    return str(caption) if caption else names.get(annotation.get("category_id"), "")


def annotation_box(annotation: dict[str, Any]) -> list[float]:
    """COCO's x, y, w, h -> x1, y1, x2, y2 in pixels."""
    x, y, w, h = (float(v) for v in annotation["bbox"])
    return [x, y, x + w, y + h]


def letterbox(image: np.ndarray, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 -> (3, side, side) uint8 with the long side resized to ``side`` and the
    rest zero (bottom/right), and the resized (h, w)."""
    from ovseg.layers.resize import resize_image

    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = resize_image(image, size) if size != (height, width) else image
    out = torch.zeros((3, side, side), dtype=torch.uint8)
    out[:, :size[0], :size[1]] = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
    return out, size


class RegionTrainSet:
    """Training samples of region sets: images with up to M regions and an image caption.

    ``[i]``: ``image`` (3, S, S) uint8 letterboxed; ``resized`` (2,) int64; ``boxes`` (M, 4)
    float32 xyxy in [0, 1] of the padded input; ``region_valid`` (M,) bool; ``region_text`` M
    strings ("" where invalid); ``caption`` str ("" = none). Regions are drawn at random
    (torch's RNG, seeded per worker by the engine) among the image's non-crowd annotations.
    """

    def __init__(self, sets: list[RegionSet], image_size: int, regions_per_image: int,
                 text_mode: str):
        self.image_size = image_size
        self.regions_per_image = regions_per_image
        self.items: list[tuple[Path, tuple[int, int], list[list[float]], list[str],
                               list[str]]] = []
        for region_set in sets:
            coco = load_coco(region_set.annotations)
            ids, names = category_names(coco)
            by_id = dict(zip(ids, names, strict=True))
            captions: dict[int, list[str]] = {}
            if region_set.captions is not None:
                for ann in load_coco(region_set.captions).dataset.get("annotations", []):
                    captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
            for image_id in sorted(coco.getImgIds()):
                info = coco.loadImgs(image_id)[0]
                anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
                        if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
                texts = [region_text(a, by_id, text_mode) for a in anns]
                keep = [i for i, t in enumerate(texts) if t]
                image_captions = captions.get(image_id) or (
                    [str(info["caption"])] if info.get("caption") else [])
                if not keep and not image_captions:
                    continue
                self.items.append((image_path(region_set.image_dir, info),
                                   (int(info["height"]), int(info["width"])),
                                   [annotation_box(anns[i]) for i in keep],
                                   [texts[i] for i in keep], image_captions))
        if not self.items:
            raise DatasetError("the CLOC training sets have no image with regions or captions")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, (height, width), boxes, texts, captions = self.items[index]
        image = read_image(path)
        if image.shape[:2] != (height, width):  # boxes are in the file's pixels
            height, width = image.shape[:2]
        pixels, resized = letterbox(image, self.image_size)
        count = self.regions_per_image
        chosen = torch.randperm(len(boxes))[:count].tolist()
        out_boxes = torch.zeros((count, 4), dtype=torch.float32)
        valid = torch.zeros(count, dtype=torch.bool)
        out_texts = [""] * count
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        for slot, i in enumerate(chosen):
            box = torch.minimum(torch.tensor(boxes[i], dtype=torch.float64).clamp(min=0), scale)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            out_boxes[slot] = (box / max(height, width)).float()
            valid[slot] = True
            out_texts[slot] = texts[i]
        caption = captions[int(torch.randint(len(captions), (1,)))] if captions else ""
        return {"image": pixels, "resized": torch.tensor(resized), "boxes": out_boxes,
                "region_valid": valid, "region_text": out_texts, "caption": caption}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors; ``region_text`` becomes a list of B lists, ``caption`` a list."""
    batch = {key: torch.stack([s[key] for s in samples])
             for key in ("image", "resized", "boxes", "region_valid")}
    batch["region_text"] = [list(s["region_text"]) for s in samples]
    batch["caption"] = [s["caption"] for s in samples]
    return batch
