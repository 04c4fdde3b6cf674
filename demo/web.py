"""The web demo: a browser page for open-vocabulary segmentation with any registered 2D method.

    pip install -e ".[web]"
    python demo/web.py --config-file configs/tiny/dense_clip_tiny.yaml [--port 7860] [--share]

Upload an image (or pick a bundled example), type a vocabulary ("cat, dog; puppy, sky"),
choose a method and one of its configs, press Segment: the page shows the overlay with a
legend, the label map, the area of every class and the time of each step, and offers the label
PNG and the JSON summary for download. A method with region prompts (CLOC) also classifies
clicked points and boxes (two clicks) and lists each region's top labels.

What costs time is done once and kept: a model per (config, weights, overrides), the image
state of ``model.encode`` per (model, image), so a new vocabulary on the same image only
rescores the state, without any encoder forward; the methods keep their text classifiers per
vocabulary. One encoder forward runs at a time (Gradio's queue and a lock), so concurrent users
wait instead of sharing the CPU. Images with a side above ``--max-side`` are downscaled (the
page says so); uploads above ``--max-upload-mb`` are refused by the page. A user's mistake
(no image, not an image, an empty vocabulary, a bad config key, missing weights) is one line on
the page; anything else is one line there and a traceback on the console.

Trailing ``KEY VALUE`` pairs fill the page's overrides box (applied to the chosen config). The
page binds to 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (off by default) asks
Gradio for a public link. :class:`WebDemo` holds the page's logic and imports no Gradio, so it
is tested without a browser (tests/web/).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import typing
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import ovseg
from ovseg.config.loader import config_method_name, configs_dir
from ovseg.data.image_io import read_image
from ovseg.errors import ConfigError, ImageReadError, OvsegError
from ovseg.methods import METHODS
from ovseg.text import Vocabulary, parse_vocabulary
from ovseg.vis import (
    class_fractions,
    draw_regions,
    legend_overlay,
    palette,
    write_json,
    write_label_png,
)

LOGGER = logging.getLogger("ovseg.web")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# a CPU segments a 1024 px image in seconds with ViT-B/16; larger photos gain little detail
DEFAULT_MAX_SIDE = 1024
DEFAULT_MAX_UPLOAD_MB = 20
# each cached model holds its encoders (a ViT-B CLIP is ~600 MB), each image state its features
DEFAULT_MAX_MODELS = 2
DEFAULT_MAX_IMAGES = 8
# result folders (label PNG + JSON for the download buttons) kept before the oldest is removed
KEPT_RESULTS = 64
# labels of each clicked region listed on the page
TOP_REGION_LABELS = 3
# training configs hold no model worth showing (their heads start untrained)
TRAINING_CONFIG_MARK = "train"

POINT_MODE = "point"
BOX_MODE = "box (two clicks: corners)"

EXAMPLE_VOCABULARIES = {
    # photos that scikit-image ships inside its wheel, so the examples need no download
    "chelsea.png": "cat, wall, floor",
    "coffee.png": "coffee; cup, saucer, spoon, table",
    "astronaut.png": "person; astronaut, flag, rocket, background",
    "rocket.jpg": "rocket, sky, trees, building",
}


# ---------------------------------------------------------------------------------- configs


def method_class(method: str) -> type | None:
    """The class a method's builder returns (its return annotation), so the page knows what a
    method's models can do before building one; None when the builder does not say."""
    try:
        return typing.get_type_hints(METHODS[method].build).get("return")
    except (KeyError, NameError, TypeError):
        return None


def segments_images(method: str) -> bool:
    """Whether ``method`` predicts 2D label maps; CLIP2Scene (3D point clouds) does not."""
    return callable(getattr(method_class(method), "predict", None))


def takes_region_prompts(method: str) -> bool:
    """Whether ``method``'s models classify box and point prompts (``classify_regions``)."""
    return callable(getattr(method_class(method), "classify_regions", None))


def config_method(path: Path) -> str | None:
    """``model.name`` as a config file and its ``_base_`` files set it; None for a base."""
    return config_method_name(path)


def has_refinement(method: str) -> bool:
    """Whether ``method`` owns a ``model.refine`` section (SAM refinement of its labels)."""
    return method in METHODS and "refine" in METHODS[method].extra


def config_name(config: str) -> str:
    """A config as the page lists it: relative to the configs directory when it lies there
    (``configs/tiny/x.yaml`` -> ``tiny/x.yaml``), else as given."""
    path = Path(config).expanduser()
    if path.is_file():
        try:
            return path.resolve().relative_to(configs_dir().resolve()).as_posix()
        except ValueError:
            return config
    return config


def list_configs(root: Path | None = None) -> dict[str, list[str]]:
    """The page's choices: method -> its config names (relative to ``root``, default the
    configs directory), for every registered method that segments 2D images, registry order.

    Training configs and partial files (no ``model.name`` in their chain) are left out, and so
    is a file the loader refuses (logged).
    """
    root = configs_dir() if root is None else root
    choices: dict[str, list[str]] = {name: [] for name in METHODS if segments_images(name)}
    for path in sorted(root.rglob("*.yaml")):
        if TRAINING_CONFIG_MARK in path.stem:
            continue
        try:
            method = config_method(path)
        except OvsegError as error:
            LOGGER.warning("config %s left off the page: %s", path, error)
            continue
        if method in choices:
            choices[method].append(path.relative_to(root).as_posix())
    # the tiny configs first: they run without any weights
    return {method: sorted(names, key=lambda name: not name.startswith("tiny/"))
            for method, names in choices.items() if names}


def left_off_methods() -> list[str]:
    """Registered methods the 2D page cannot show (3D ones)."""
    return [name for name in METHODS if not segments_images(name)]


# ---------------------------------------------------------------------------------- caches


class LruCache:
    """A dict that keeps its ``capacity`` most recently used entries."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity is {capacity}; expected at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: Any, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class ModelSpec:
    """Which model a request wants: everything its cache key holds.

    config: a config name (relative to the configs directory) or path;
    weights: ``model.weights`` ("" = none);
    overrides: ``KEY VALUE`` pairs applied after the config;
    refine: ``model.refine.enabled`` for methods with SAM refinement (None = as configured).
    """

    config: str
    weights: str = ""
    overrides: tuple[str, ...] = ()
    refine: bool | None = None

    @classmethod
    def from_page(cls, config: str | None, weights: str | None, overrides: str | None,
                  refine: bool | None) -> ModelSpec:
        """The spec of the page's fields; the overrides box is split like a shell line."""
        if not config:
            raise ConfigError("no config chosen; pick a method and one of its configs")
        try:
            pairs = tuple(shlex.split(overrides or ""))
        except ValueError as error:
            raise ConfigError(f"overrides {overrides!r}: {error}") from error
        return cls(config, (weights or "").strip(), pairs, refine)


@dataclass
class Timing:
    """Seconds of each step of a request; None = cached, nothing ran."""

    model: float | None
    encode: float | None
    score: float
    total: float
    # why the encoder ran although the image was seen before (a method without encode())
    encode_note: str = ""

    def markdown(self) -> str:
        def seconds(value: float | None, cached: str) -> str:
            return cached if value is None else f"{value:.2f} s"

        encode = seconds(self.encode, "cached (no encoder forward)")
        if self.encode_note:
            encode += f" ({self.encode_note})"
        return (f"**Time**: model {seconds(self.model, 'cached')} · image encoder {encode} · "
                f"scoring {self.score:.2f} s · total {self.total:.2f} s")


@dataclass
class LoadedImage:
    """An uploaded image as the models see it: (H, W, 3) uint8 RGB, at most the page's side.

    scale: its size over the uploaded file's (1.0 when not downscaled); note: what the page
    says about it ("" when nothing to say).
    """

    pixels: np.ndarray
    name: str
    scale: float = 1.0
    note: str = ""

    @property
    def key(self) -> str:
        """sha256 of the pixels and their shape: the image's part of the state cache's key."""
        digest = hashlib.sha256(repr(self.pixels.shape).encode())
        digest.update(np.ascontiguousarray(self.pixels).data)
        return digest.hexdigest()


@dataclass
class SegmentResult:
    """What the page shows after Segment.

    overlay: (H', W', 3) uint8 RGB, colours over the image with a legend;
    label_map: (H, W, 3) uint8 RGB, each class in its colour;
    areas: one row [class, area %, pixels] per vocabulary class, largest first;
    labels_png / summary_json: the files of the download buttons.
    """

    overlay: np.ndarray
    label_map: np.ndarray
    areas: list[list[Any]]
    timing: Timing
    labels_png: Path
    summary_json: Path
    message: str


@dataclass
class RegionResult:
    """What the page shows for region prompts: the image with each prompt drawn in its best
    class's colour, and per region [region, top labels with their cosines]."""

    image: np.ndarray
    rows: list[list[str]]
    timing: Timing
    message: str


@dataclass
class RegionPrompts:
    """A session's clicked prompts, in pixels of the uploaded file: (x, y) points, (x1, y1, x2,
    y2) boxes, and the first corner of a box still waiting for its second click."""

    points: list[list[float]] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    corner: list[float] | None = None

    def add_click(self, xy: Sequence[float], mode: str) -> RegionPrompts:
        """A copy with the click added: a point, or a box corner (two clicks make a box)."""
        x, y = (float(v) for v in xy)
        points, boxes, corner = list(self.points), list(self.boxes), self.corner
        if mode == BOX_MODE:
            if corner is None:
                return RegionPrompts(points, boxes, [x, y])
            boxes.append([min(corner[0], x), min(corner[1], y),
                          max(corner[0], x), max(corner[1], y)])
            return RegionPrompts(points, boxes, None)
        points.append([x, y])
        return RegionPrompts(points, boxes, corner)

    @property
    def empty(self) -> bool:
        return not self.points and not self.boxes

    def region_names(self) -> list[str]:
        """"box (x1, y1, x2, y2)" and "point (x, y)" in file pixels: boxes first, as the
        methods take them."""
        return [f"{kind} ({', '.join(f'{v:.0f}' for v in coords)})"
                for kind, group in (("box", self.boxes), ("point", self.points))
                for coords in group]

    def describe(self) -> str:
        parts = self.region_names()
        if self.corner is not None:
            parts.append(f"box corner ({self.corner[0]:.0f}, {self.corner[1]:.0f}): click the "
                         "opposite corner")
        return "Prompts: " + ("; ".join(parts) if parts else "none (click the image)")


# ---------------------------------------------------------------------------------- logic


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def area_rows(labels: np.ndarray, class_names: Sequence[str]) -> list[list[Any]]:
    """[class, area %, pixels] for every class of the vocabulary: the classes present by
    decreasing area, then the absent ones (0 %) in vocabulary order."""
    fractions = class_fractions(labels, class_names)
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(class_names))
    index_of = {name: i for i, name in reversed(list(enumerate(class_names)))}
    ordered = list(fractions) + [name for name in class_names if name not in fractions]
    return [[name, round(100.0 * fractions.get(name, 0.0), 2), int(counts[index_of[name]])]
            for name in ordered]


class WebDemo:
    """The page's logic: cached models and image states, segmentation, region prompts.

    Args:
        max_side: images with a longer side are downscaled to it (with a note).
        device: ``model.device`` of every model (None = the config's).
        max_models, max_images: how many models and image states are kept.
        output_dir: where the download files go (default: a temporary folder, removed by
            :meth:`close`).
    """

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, device: str | None = None,
                 max_models: int = DEFAULT_MAX_MODELS, max_images: int = DEFAULT_MAX_IMAGES,
                 output_dir: Path | None = None):
        if max_side < 16:
            raise ConfigError(f"--max-side is {max_side}; give at least 16 pixels")
        self.max_side = max_side
        self.device = device
        self._models = LruCache(max_models)
        self._states = LruCache(max_images)
        self._owns_output = output_dir is None
        self.output_dir = Path(tempfile.mkdtemp(prefix="ovseg-web-")) if output_dir is None \
            else Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._results: deque[Path] = deque()
        # Gradio's queue already runs one forward at a time; the lock keeps WebDemo safe when
        # it is driven some other way (tests, another front end)
        self._forward = threading.Lock()

    def close(self) -> None:
        """Remove the download files (when the folder is this demo's own)."""
        if self._owns_output:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    # ---- inputs ------------------------------------------------------------------------------
    def load_image(self, path: str | os.PathLike[str] | None, name: str | None = None
                   ) -> LoadedImage:
        """Read an uploaded file; a longer side than ``max_side`` is downscaled (with a note).

        Raises:
            ImageReadError: no file, or not an image.
        """
        if not path:
            raise ImageReadError("no image: upload one or pick an example")
        name = name or Path(path).name
        try:
            pixels = read_image(path)
        except ImageReadError as error:
            # the user knows the file by its name, not by the server's upload path
            raise ImageReadError(_one_line(error).replace(os.fspath(path), name)) from error
        height, width = pixels.shape[:2]
        if max(height, width) <= self.max_side:
            return LoadedImage(pixels, name)
        scale = self.max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # INTER_AREA averages the pixels a downscale merges; bilinear would alias
        small = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        note = (f"{name} is {width}x{height}; it was downscaled to {size[0]}x{size[1]} (the "
                f"page's largest side is {self.max_side} px), and the outputs have that size")
        return LoadedImage(small, name, scale=size[0] / width, note=note)

    # ---- models and states -------------------------------------------------------------------
    def config(self, spec: ModelSpec):
        """The merged config of ``spec`` (device, refinement, weights, then the overrides)."""
        overrides: list[str] = []
        if self.device:
            overrides += ["model.device", self.device]
        if spec.refine is not None:
            overrides += ["model.refine.enabled", str(spec.refine).lower()]
        if spec.weights:
            overrides += ["model.weights", spec.weights]
        return ovseg.get_config(spec.config, [*overrides, *spec.overrides])

    def model(self, spec: ModelSpec) -> tuple[Any, float | None]:
        """The model of ``spec``, built once; and the seconds its build took (None: cached)."""
        cached = self._models.get(spec)
        if cached is not None:
            return cached, None
        start = time.perf_counter()
        cfg = self.config(spec)
        if not segments_images(cfg.model.name):
            raise ConfigError(f"{spec.config} is a {cfg.model.name} config, which is not a 2D "
                              "method; this page segments images")
        model = ovseg.build_model(cfg)
        self._models.put(spec, model)
        return model, time.perf_counter() - start

    def image_state(self, spec: ModelSpec, model, image: LoadedImage
                    ) -> tuple[Any, float | None, str]:
        """``model.encode(image)``, kept per (model, image): the state, the seconds the encoder
        took (None: cached) and why it runs every time ("" unless the method has no encode)."""
        if not callable(getattr(model, "encode", None)):
            # predict() then takes the image itself and runs the encoder each time
            return image.pixels, 0.0, "runs on every request: this method has no encode()"
        key = (spec, image.key)
        state = self._states.get(key)
        if state is not None:
            return state, None, ""
        start = time.perf_counter()
        state = model.encode(image.pixels)
        self._states.put(key, state)
        return state, time.perf_counter() - start, ""

    # ---- requests ----------------------------------------------------------------------------
    def segment(self, path: str | os.PathLike[str] | None, vocabulary_text: str | None,
                spec: ModelSpec, name: str | None = None) -> SegmentResult:
        """Segment the uploaded file into the vocabulary (``,`` between classes, ``;`` between
        synonyms). Raises an :class:`OvsegError` (one line) for anything the user can fix."""
        start = time.perf_counter()
        # the cheap checks come before the image is read and the model built
        vocabulary = parse_vocabulary(vocabulary_text or "")
        image = self.load_image(path, name)
        with self._forward:
            model, build_seconds = self.model(spec)
            state, encode_seconds, encode_note = self.image_state(spec, model, image)
            score_start = time.perf_counter()
            prediction = model.predict(state, vocabulary)
            score_seconds = time.perf_counter() - score_start
            if encode_note:  # predict() ran the encoder too
                encode_seconds, score_seconds = score_seconds, 0.0
        labels, classes = prediction.labels, list(prediction.classes)
        timing = Timing(build_seconds, encode_seconds, score_seconds,
                        time.perf_counter() - start, encode_note)
        labels_png, summary_json = self._write_downloads(image, labels, classes)
        message = (f"Segmented {image.name} ({image.pixels.shape[1]}x{image.pixels.shape[0]}) "
                   f"into {len(classes)} classes with {spec.config}.")
        if image.note:
            message += f"\n\nNote: {image.note}."
        return SegmentResult(
            overlay=legend_overlay(image.pixels, labels, classes),
            label_map=palette(classes)[labels],
            areas=area_rows(labels, classes),
            timing=timing,
            labels_png=labels_png,
            summary_json=summary_json,
            message=message,
        )

    def classify_regions(self, path: str | os.PathLike[str] | None,
                         vocabulary_text: str | None, spec: ModelSpec, prompts: RegionPrompts,
                         name: str | None = None) -> RegionResult:
        """Classify the clicked points and boxes of the uploaded file (a method with region
        prompts); the prompts are in the uploaded file's pixels."""
        start = time.perf_counter()
        vocabulary = parse_vocabulary(vocabulary_text or "")
        if prompts.empty:
            raise ConfigError("no region prompt yet: click the image (a point, or two corners "
                              "of a box)")
        image = self.load_image(path, name)
        scale = image.scale
        boxes = np.asarray(prompts.boxes, dtype=np.float64).reshape(-1, 4) * scale
        points = np.asarray(prompts.points, dtype=np.float64).reshape(-1, 2) * scale
        boxes_or_none = boxes if len(boxes) else None
        points_or_none = points if len(points) else None
        with self._forward:
            model, build_seconds = self.model(spec)
            if not callable(getattr(model, "classify_regions", None)):
                raise ConfigError(f"{spec.config}: this method takes no point or box prompts; "
                                  "choose a method with region prompts (cloc)")
            state, encode_seconds, _ = self.image_state(spec, model, image)
            score_start = time.perf_counter()
            labels, cosines = model.classify_regions(state, vocabulary, boxes=boxes_or_none,
                                                     points=points_or_none)
            score_seconds = time.perf_counter() - score_start
        shown, _ = draw_regions(image.pixels, boxes_or_none, points_or_none,
                                      labels.tolist(), vocabulary.class_names)
        rows = _region_rows(prompts.region_names(), cosines.numpy(), vocabulary)
        timing = Timing(build_seconds, encode_seconds, score_seconds,
                        time.perf_counter() - start)
        plural = "" if len(rows) == 1 else "s"
        return RegionResult(shown, rows, timing, f"Classified {len(rows)} region{plural}.")

    def _write_downloads(self, image: LoadedImage, labels: np.ndarray, classes: list[str]
                         ) -> tuple[Path, Path]:
        """The label PNG and JSON summary (the demo CLI's formats) in a folder of their own, so
        that concurrent users never overwrite each other's downloads."""
        folder = self.output_dir / uuid.uuid4().hex
        folder.mkdir()
        self._results.append(folder)
        while len(self._results) > KEPT_RESULTS:
            shutil.rmtree(self._results.popleft(), ignore_errors=True)
        stem = Path(image.name).stem or "image"
        labels_png, summary_json = folder / f"{stem}_labels.png", folder / f"{stem}.json"
        write_label_png(labels_png, labels, len(classes))
        write_json(summary_json, {
            "image": image.name,
            "classes": classes,
            "fractions": class_fractions(labels, classes),
            "height": int(labels.shape[0]),
            "width": int(labels.shape[1]),
        })
        return labels_png, summary_json


def _region_rows(names: list[str], cosines: np.ndarray, vocabulary: Vocabulary
                 ) -> list[list[str]]:
    """Per region: its name and its top classes with their cosines ((R, C) class cosines)."""
    rows = []
    top = min(TOP_REGION_LABELS, vocabulary.num_classes)
    for name, region_cosines in zip(names, cosines, strict=True):
        best = np.argsort(-region_cosines, kind="stable")[:top]
        labels = ", ".join(f"{vocabulary.class_names[i]} {region_cosines[i]:.3f}" for i in best)
        rows.append([name, labels])
    return rows


# ---------------------------------------------------------------------------------- page


def example_images() -> list[list[str]]:
    """[photo path, vocabulary] of the photos scikit-image ships (none without it)."""
    try:
        import skimage.data
    except ImportError:
        return []
    folder = Path(skimage.data.__file__).parent
    return [[str(folder / name), vocabulary] for name, vocabulary in EXAMPLE_VOCABULARIES.items()
            if (folder / name).is_file()]


def _uploaded_path(payload) -> str | None:
    """The path of an upload (Gradio's FileData) as the server stored it; None: no upload."""
    return None if payload is None else payload.path


def error_message(error: BaseException) -> str:
    """The page's one line for a failed request; a bug also logs its traceback."""
    if isinstance(error, OvsegError):
        return f"**Error**: {_one_line(error)}"
    LOGGER.error("request failed", exc_info=error)
    return (f"**Error** (unexpected, the console running demo/web.py has the traceback): "
            f"{type(error).__name__}: {_one_line(error)}")


def build_app(web: WebDemo, choices: dict[str, list[str]], config: str,
              overrides: Sequence[str] = ()):
    """The Gradio page around ``web``; ``config`` is chosen first (its method's list gains it
    when it lies outside the configs directory), ``overrides`` fill the overrides box."""
    # Gradio reads it when the page is built and launched: the page sends no telemetry
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    config = config_name(config)
    initial_method = ovseg.get_config(config).model.name
    if not segments_images(initial_method):
        raise ConfigError(f"--config-file {config} is a {initial_method} config, which is not "
                          "a 2D method; the web page segments images")
    choices = {method: list(names) for method, names in choices.items()}
    if config not in choices.setdefault(initial_method, []):
        choices[initial_method].insert(0, config)
    left_off = left_off_methods()
    method_note = (f"Not listed: {', '.join(left_off)} (3D point clouds: demo/demo3d.py)"
                   if left_off else None)

    def refine_settings(name: str) -> dict[str, Any]:
        """The SAM-refinement box for a config: as configured when its method has SAM
        refinement, off and greyed out otherwise."""
        try:
            cfg = ovseg.get_config(name)
        except OvsegError:
            return {"value": False, "interactive": False, "info": None}
        if not has_refinement(cfg.model.name):
            return {"value": False, "interactive": False,
                    "info": f"{cfg.model.name} has no SAM refinement"}
        return {"value": bool(cfg.model.refine.enabled), "interactive": True,
                "info": "model.refine.enabled: SAM's masks sharpen the labels"}

    def on_method(method: str):
        names = choices.get(method, [])
        first = names[0] if names else None
        regions = gr.Group(visible=takes_region_prompts(method))
        return gr.Dropdown(choices=names, value=first), regions, regions

    def on_config(name: str | None):
        return gr.Checkbox(**refine_settings(name or ""))

    def spec_of(method, name, weights, overrides_text, refine) -> ModelSpec:
        # the box is greyed out for a method without refinement: leave its config alone then
        refine = bool(refine) if has_refinement(method) else None
        return ModelSpec.from_page(name, weights, overrides_text, refine)

    def on_segment(path, vocabulary_text, method, name, weights, overrides_text, refine,
                   prompts_state):
        try:
            spec = spec_of(method, name, weights, overrides_text, refine)
            result = web.segment(path, vocabulary_text, spec)
        except Exception as error:  # every failure becomes the page's message
            return (error_message(error), None, None, None, "",
                    gr.DownloadButton(value=None, interactive=False),
                    gr.DownloadButton(value=None, interactive=False))
        return (result.message, result.overlay, result.label_map, result.areas,
                result.timing.markdown(),
                gr.DownloadButton(value=str(result.labels_png), interactive=True),
                gr.DownloadButton(value=str(result.summary_json), interactive=True))

    def on_regions(path, vocabulary_text, method, name, weights, overrides_text, refine,
                   prompts_state):
        prompts = RegionPrompts(**prompts_state)
        if prompts.empty or not takes_region_prompts(method):
            return gr.skip(), gr.skip(), gr.skip()
        try:
            spec = spec_of(method, name, weights, overrides_text, refine)
            result = web.classify_regions(path, vocabulary_text, spec, prompts)
        except Exception as error:  # every failure becomes the page's message
            return error_message(error), None, None
        return f"{result.message}\n\n{result.timing.markdown()}", result.image, result.rows

    def on_click(prompts_state, mode, event: gr.SelectData):
        prompts = RegionPrompts(**prompts_state).add_click(event.index, mode)
        return vars(prompts), prompts.describe()

    # Gradio finds the click's data by this annotation; this module's annotations are strings
    # (``from __future__``) that it cannot resolve, gradio being imported here and not above
    on_click.__annotations__["event"] = gr.SelectData

    def on_clear():
        empty = RegionPrompts()
        return vars(empty), empty.describe(), "", None, None

    with gr.Blocks(title="ovseg web demo", analytics_enabled=False) as app:
        gr.Markdown("# ovseg: open-vocabulary segmentation\nName any classes, get a label for "
                    "every pixel. `,` separates classes, `;` synonyms of one class.")
        prompts_state = gr.State(vars(RegionPrompts()))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", sources=["upload"],
                                 elem_id="input-image")
                # the handlers get the uploaded file's path undecoded (gr.Image would open it
                # with PIL first), so that a file that is no image gets the page's message, not
                # Gradio's decoding error; an instance attribute, because a subclass of a
                # Gradio component makes Gradio write a .pyi stub beside this file
                image.preprocess = _uploaded_path
                vocabulary = gr.Textbox(label="Vocabulary", elem_id="vocabulary",
                                        placeholder="cat, dog; puppy, grass, sky")
                method = gr.Dropdown(list(choices), value=initial_method, label="Method",
                                     info=method_note, elem_id="method")
                config_box = gr.Dropdown(choices[initial_method], value=config,
                                         label="Config", elem_id="config")
                refine = gr.Checkbox(label="SAM refinement", elem_id="refine",
                                     **refine_settings(config))
                with gr.Accordion("Weights and overrides", open=False):
                    weights = gr.Textbox(label="Weights (model.weights)", elem_id="weights",
                                         placeholder="/path/to/model.safetensors")
                    overrides_box = gr.Textbox(label="Overrides (KEY VALUE ...)",
                                               value=shlex.join(overrides),
                                               elem_id="overrides",
                                               placeholder="model.inference.short_side 448")
                with gr.Group(visible=takes_region_prompts(initial_method)) as region_group:
                    gr.Markdown("**Region prompts**: click the image to add a point, or two "
                                "corners of a box.")
                    mode = gr.Radio([POINT_MODE, BOX_MODE], value=POINT_MODE,
                                    label="A click adds", elem_id="prompt-mode")
                    prompts_text = gr.Markdown(RegionPrompts().describe(),
                                               elem_id="prompts")
                    clear = gr.Button("Clear prompts", size="sm")
                segment = gr.Button("Segment", variant="primary", elem_id="segment")
                examples = example_images()
                if examples:
                    gr.Examples(examples, inputs=[image, vocabulary],
                                label="Examples (scikit-image's photos)")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image, type a vocabulary, press Segment.",
                                     elem_id="status")
                timing = gr.Markdown("", elem_id="timing")
                overlay_view = gr.Image(label="Overlay", format="png", interactive=False,
                                        elem_id="overlay")
                label_view = gr.Image(label="Label map", format="png", interactive=False,
                                      elem_id="label-map")
                areas = gr.Dataframe(headers=["class", "area %", "pixels"],
                                     datatype=["str", "number", "number"], interactive=False,
                                     label="Area per class", elem_id="areas")
                with gr.Row():
                    download_labels = gr.DownloadButton("Label PNG", interactive=False,
                                                        elem_id="download-labels")
                    download_json = gr.DownloadButton("JSON summary", interactive=False,
                                                      elem_id="download-json")
                with gr.Group(visible=takes_region_prompts(initial_method)) as region_results:
                    region_status = gr.Markdown("", elem_id="region-status")
                    region_view = gr.Image(label="Regions", format="png", interactive=False,
                                           elem_id="regions")
                    region_table = gr.Dataframe(headers=["region", "top labels (cosine)"],
                                                interactive=False, elem_id="region-labels")

        request = [image, vocabulary, method, config_box, weights, overrides_box, refine,
                   prompts_state]
        region_outputs = [region_status, region_view, region_table]
        method.change(on_method, method, [config_box, region_group, region_results])
        config_box.change(on_config, config_box, refine)
        # a new image drops the prompts of the previous one
        cleared = [prompts_state, prompts_text, *region_outputs]
        image.change(on_clear, None, cleared)
        clear.click(on_clear, None, cleared)
        heavy = {"concurrency_id": "forward", "concurrency_limit": 1}
        segment.click(
            on_segment, request,
            [status, overlay_view, label_view, areas, timing, download_labels, download_json],
            **heavy,
        ).then(on_regions, request, region_outputs, **heavy)
        image.select(on_click, [prompts_state, mode], [prompts_state, prompts_text]).then(
            on_regions, request, region_outputs, **heavy)
    # requests beyond this wait count are refused with Gradio's "queue is full" message
    app.queue(max_size=32, default_concurrency_limit=1)
    return app


def theme():
    """Gradio's default look with the system's fonts: the page fetches nothing from outside."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def launch(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False,
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, block: bool = True):
    """Serve the page; ``block`` False returns once it is up (tests)."""
    return app.launch(server_name=host, server_port=port, share=share,
                      max_file_size=int(max_upload_mb * 2**20), show_error=True, quiet=not block,
                      prevent_thread_lock=not block, ssr_mode=False, theme=theme())


# ---------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="web.py",
        description="A browser page for open-vocabulary segmentation (Gradio).",
        epilog="Trailing KEY VALUE pairs fill the page's overrides box.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="config chosen when the page opens (any config of configs/ can "
                        "be picked on the page)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true",
                        help="also ask Gradio for a public link (off by default)")
    parser.add_argument("--device", default=None,
                        help="torch device of every model (sets model.device)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PIXELS",
                        help="larger images are downscaled to this longest side "
                        f"(default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        metavar="MB", help=f"largest upload (default {DEFAULT_MAX_UPLOAD_MB})")
    parser.add_argument("--max-models", type=int, default=DEFAULT_MAX_MODELS, metavar="N",
                        help=f"models kept in memory (default {DEFAULT_MAX_MODELS})")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. model.inference.short_side 448")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the web demo needs Gradio: pip install -e ".[web]"', file=sys.stderr)
        return 2
    try:
        web = WebDemo(max_side=args.max_side, device=args.device, max_models=args.max_models)
        try:
            app = build_app(web, list_configs(), args.config_file, args.opts)
            launch(app, args.host, args.port, args.share, args.max_upload_mb)
        finally:
            web.close()
    except OvsegError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
