"""The benchmark catalog: each benchmark by name, where its files live and how to read them.

A benchmark's entry (``BenchmarkInfo``) says where its images and labels live under the
datasets root, how label files are mapped to class indices at read time, its ignore value, its
class file and, for benchmarks whose class 0 is "background", the words that stand for
background in a text classifier. ``load_dataset(name)`` turns an entry into a sequence of
``{image, label, image_path, label_path}`` samples; ``register_custom_dataset`` adds a folder of
images + label PNGs under a new name. See ``specs/evaluation.md`` for where every mapping and
ignore value comes from, and ``datasets/README.md`` for how to obtain and prepare the files.

The datasets root is, in order: the ``root`` argument (or ``datasets.root`` of a config),
``$OVSEG_DATASETS``, ``./datasets``.

Class files (``ovseg/data/classes/<name>.txt``) hold one class per line, synonyms separated by
``", "``, in the order of the label values. They are the reference lists (ADE-150: objectInfo150
names; ADE-847: the WordNet strings of the ADE20K-full list that ov-seg / SAN / CAT-Seg use;
Pascal Context: the labels of the 459-class release, 59 of them in id order; COCO-Stuff: 80
things then 91 stuff, in id order) with one edit: ``read_vocabulary_file`` keeps a name only in
the first class that lists it, which would drop whole ADE-847 classes (e.g. "stool" is also a
synonym of "toilet"). So where classes of ADE-847 share a name, it stays with one class - the
class for which it is the only name, else the class it names first, else the first class - and
is removed from the synonyms of the others ("toilet, commode, crapper, potty" and "stool";
"flowerpot" and "pot"). No name was added.

Prompt-name files (``ovseg/data/classes/prompts/<set>/<name>.txt``) are a reference method's own
class-name file for a benchmark (same classes, same order, its synonyms and background words),
chosen with ``class_vocabulary(name, prompt_names=<set>)`` / ``text.prompt_names``; each file's
header says where it comes from and what was edited.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ovseg.data.image_io import read_image
from ovseg.data.readers import read_label
from ovseg.errors import DatasetError, OvsegError
from ovseg.text import Vocabulary, read_vocabulary_file

CLASSES_DIR = Path(__file__).resolve().parent / "classes"
PROMPTS_DIR = CLASSES_DIR / "prompts"
DEFAULT_DATASETS_ROOT = Path("datasets")
DATASETS_ENV = "OVSEG_DATASETS"
_README_HINT = "see datasets/README.md for how to obtain and prepare it"

BenchmarkKind = Literal["sem_seg", "point_cloud"]
LabelMapping = Literal["none", "reduce_zero_label", "shift_up_background"]

# SCLIP's background words for VOC-21 and COCO-Object (line 0 of its cls_voc21.txt and
# cls_coco_object.txt): stuff that is not one of the object classes
SCLIP_BACKGROUND_WORDS = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk",
    "bed", "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf",
    "curtain", "stair", "floor", "hill", "rail", "fence",
)  # fmt: skip


@dataclass(frozen=True)
class BenchmarkInfo:
    """Where a benchmark's files are and how to read them.

    Samples are found one of two ways:
    - ``id_list`` set: one sample per line of that file (an id), the image
      ``<image_dir>/<id><image_suffix>`` and label ``<label_dir>/<id><label_suffix>``;
    - else: every file matching ``image_glob`` under ``image_dir``; a sample's key is the
      image's path relative to ``image_dir`` without ``image_suffix`` (``frankfurt/x`` for
      ``frankfurt/x_leftImg8bit.png``), its label ``<label_dir>/<key><label_suffix>``.
    Directories are relative to the datasets root, unless absolute (custom datasets).

    ``label_mapping`` is applied by ``readers.read_label``:
    - ``none``: stored values are class indices;
    - ``reduce_zero_label``: stored 0 (unlabeled / background) -> ignore, v -> v - 1, a stored
      ignore value stays ignore (ADE-150 raw PNGs, VOC-20);
    - ``shift_up_background``: the stored ignore value (unlabeled) -> 0 = background,
      v -> v + 1 (Context-60 from the Context-59 PNGs), so no pixel is ignored.
    """

    name: str
    kind: BenchmarkKind
    class_file: Path
    num_classes: int
    ignore_value: int
    split: str
    image_dir: str
    image_glob: str = ""
    image_suffix: str = ".jpg"
    label_dir: str = ""
    label_suffix: str = ".png"
    id_list: str | None = None
    background_words: tuple[str, ...] | None = None
    has_background: bool = False
    label_mapping: LabelMapping = "none"
    description: str = ""
    custom: bool = False


def _builtin(name: str, num_classes: int, **fields: Any) -> BenchmarkInfo:
    return BenchmarkInfo(
        name=name, class_file=CLASSES_DIR / f"{name}.txt", num_classes=num_classes, **fields
    )


_ADE = "ADEChallengeData2016"
_ADE_FULL = "ADE20K_2021_17_01"
_VOC2010 = "VOCdevkit/VOC2010"
_VOC2012 = "VOCdevkit/VOC2012"

_PCONTEXT = dict(
    kind="sem_seg",
    split="val",
    image_dir=f"{_VOC2010}/JPEGImages",
    image_suffix=".jpg",
    id_list=f"{_VOC2010}/pascalcontext_val.txt",
)
_VOC = dict(
    kind="sem_seg",
    split="val",
    image_dir=f"{_VOC2012}/JPEGImages",
    image_suffix=".jpg",
    id_list=f"{_VOC2012}/ImageSets/Segmentation/val.txt",
    label_dir=f"{_VOC2012}/SegmentationClass",
    label_suffix=".png",
    ignore_value=255,
)
_COCO = dict(
    kind="sem_seg",
    split="val2017",
    image_dir="coco/val2017",
    image_glob="*.jpg",
    image_suffix=".jpg",
    ignore_value=255,
)

BENCHMARKS: dict[str, BenchmarkInfo] = {
    info.name: info
    for info in (
        _builtin(
            "ade20k_150",
            150,
            kind="sem_seg",
            split="validation",
            ignore_value=255,
            image_dir=f"{_ADE}/images/validation",
            image_glob="*.jpg",
            label_dir=f"{_ADE}/annotations/validation",
            label_suffix=".png",
            label_mapping="reduce_zero_label",
            description="ADE20K SceneParsing, 150 classes, val 2000; raw PNGs, 0 = other",
        ),
        _builtin(
            "ade20k_847",
            847,
            kind="sem_seg",
            split="validation",
            ignore_value=65535,
            image_dir=f"{_ADE_FULL}/images_detectron2/validation",
            image_glob="*.jpg",
            label_dir=f"{_ADE_FULL}/annotations_detectron2/validation",
            label_suffix=".tif",
            description="ADE20K-full, 847 classes, val 2000; prepared uint16 TIFF labels",
        ),
        _builtin(
            "pcontext_59",
            59,
            **_PCONTEXT,
            ignore_value=255,
            label_dir=f"{_VOC2010}/annotations_detectron2/pc59_val",
            label_suffix=".png",
            description="Pascal Context, 59 classes (sorted 459-ids order), background ignored",
        ),
        _builtin(
            "pcontext_60",
            60,
            **_PCONTEXT,
            ignore_value=255,
            label_dir=f"{_VOC2010}/annotations_detectron2/pc59_val",
            label_suffix=".png",
            label_mapping="shift_up_background",
            has_background=True,
            background_words=("background",),
            description="Pascal Context, background + 59 classes, read from the Context-59 PNGs",
        ),
        _builtin(
            "pcontext_459",
            459,
            **_PCONTEXT,
            ignore_value=65535,
            label_dir=f"{_VOC2010}/annotations_detectron2/pc459_val",
            label_suffix=".tif",
            description="Pascal Context, all 459 classes; prepared uint16 TIFF labels",
        ),
        _builtin(
            "voc_20",
            20,
            **_VOC,
            label_mapping="reduce_zero_label",
            description="Pascal VOC 2012 val 1449, 20 objects, background ignored",
        ),
        _builtin(
            "voc_21",
            21,
            **_VOC,
            has_background=True,
            background_words=SCLIP_BACKGROUND_WORDS,
            description="Pascal VOC 2012 val 1449, background (index 0) + 20 objects",
        ),
        _builtin(
            "coco_stuff_171",
            171,
            **_COCO,
            label_dir="coco/stuffthingmaps_detectron2/val2017",
            label_suffix=".png",
            description="COCO-Stuff-164k val2017, 80 things + 91 stuff, prepared PNGs",
        ),
        _builtin(
            "coco_object_81",
            81,
            **_COCO,
            label_dir="coco/object_detectron2/val2017",
            label_suffix="_instanceTrainIds.png",
            has_background=True,
            background_words=SCLIP_BACKGROUND_WORDS,
            description="COCO val2017, background (stuff + unlabeled, index 0) + 80 things",
        ),
        _builtin(
            "cityscapes_19",
            19,
            kind="sem_seg",
            split="val",
            ignore_value=255,
            image_dir="cityscapes/leftImg8bit/val",
            image_glob="*/*_leftImg8bit.png",
            image_suffix="_leftImg8bit.png",
            label_dir="cityscapes/gtFine/val",
            label_suffix="_gtFine_labelTrainIds.png",
            description="Cityscapes val 500, 19 train ids",
        ),
        _builtin(
            "scannet_20",
            20,
            kind="point_cloud",
            split="val",
            ignore_value=255,
            image_dir="scannet/scans",
            image_glob="*",
            image_suffix="",
            description="ScanNet v2 val scenes, per-vertex NYU40 -> 20 classes (3D reader)",
        ),
    )
}

_CUSTOM: dict[str, BenchmarkInfo] = {}


# --------------------------------------------------------------------------- lookup


def list_benchmarks() -> list[str]:
    """Names of the built-in benchmarks (catalog order), then the registered custom datasets."""
    return [*BENCHMARKS, *_CUSTOM]


def get_benchmark(name: str) -> BenchmarkInfo:
    """The entry of a built-in benchmark or a registered custom dataset.

    Raises:
        DatasetError: unknown name; the message lists the valid names and suggests the
            closest one.
    """
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    if name in _CUSTOM:
        return _CUSTOM[name]
    known = list_benchmarks()
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    custom = ", ".join(_CUSTOM) or "none"
    raise DatasetError(
        f"unknown benchmark '{name}'; {hint}built-in: {', '.join(BENCHMARKS)}; "
        f"registered custom datasets: {custom}"
    )


def datasets_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds every benchmark: ``root`` if given (not empty), else
    ``$OVSEG_DATASETS``, else ``./datasets``."""
    if root is not None and str(root).strip():
        return Path(root).expanduser()
    env = os.environ.get(DATASETS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATASETS_ROOT


_CLASS_FILES: dict[tuple[str, int, int], Vocabulary] = {}


def _read_class_file(path: Path) -> Vocabulary:
    # keyed on the file's state, so an edited custom class file is read again
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CLASS_FILES:
        _CLASS_FILES[key] = read_vocabulary_file(path)
    return _CLASS_FILES[key]


def _benchmark_classes(info: BenchmarkInfo) -> Vocabulary:
    try:
        vocabulary = _read_class_file(info.class_file)
    except FileNotFoundError:
        raise DatasetError(
            f"class file {info.class_file} of benchmark '{info.name}' does not exist"
        ) from None
    if vocabulary.num_classes != info.num_classes:
        raise DatasetError(
            f"class file {info.class_file} has {vocabulary.num_classes} classes; benchmark "
            f"'{info.name}' has {info.num_classes}"
        )
    return vocabulary


def class_names(name: str) -> list[str]:
    """Display name of every class of a benchmark (the first name on each line of its class
    file), in label order; class 0 of a background benchmark is ``"background"``."""
    return _benchmark_classes(get_benchmark(name)).class_names


def prompt_name_sets() -> list[str]:
    """Names of the shipped prompt-name sets (folders of ``classes/prompts``), sorted."""
    if not PROMPTS_DIR.is_dir():
        return []
    return sorted(p.name for p in PROMPTS_DIR.iterdir() if p.is_dir() and p.name[0] != ".")


def prompt_file(name: str, prompt_names: str = "") -> Path:
    """The class-name file ``class_vocabulary(name, prompt_names)`` reads."""
    info = get_benchmark(name)
    prompt_names = str(prompt_names or "").strip()
    if prompt_names and not info.custom:
        _prompt_vocabulary(info, prompt_names)  # validates the set, with its clear errors
        return PROMPTS_DIR / prompt_names / f"{info.name}.txt"
    return info.class_file


def _prompt_vocabulary(info: BenchmarkInfo, prompt_names: str) -> Vocabulary:
    sets = prompt_name_sets()
    having = [s for s in sets if (PROMPTS_DIR / s / f"{info.name}.txt").is_file()]
    # checked against the shipped folders, so a set name never reaches the filesystem as a path
    if prompt_names not in having:
        problem = (
            f"is not a prompt-name set (benchmark '{info.name}')"
            if prompt_names not in sets
            else f"has no class-name file for benchmark '{info.name}'"
        )
        raise DatasetError(
            f"text.prompt_names '{prompt_names}' {problem}; "
            f"available sets: {', '.join(sets) or 'none'} (with a file for '{info.name}': "
            f"{', '.join(having) or 'none'}); '' = the catalog's class names"
        )
    path = PROMPTS_DIR / prompt_names / f"{info.name}.txt"
    try:
        vocabulary = _read_class_file(path)
    except OvsegError as error:
        raise DatasetError(f"prompt-name file of set '{prompt_names}': {error}") from error
    if vocabulary.num_classes != info.num_classes:
        raise DatasetError(
            f"prompt-name file {path} has {vocabulary.num_classes} classes; benchmark "
            f"'{info.name}' has {info.num_classes}"
        )
    return vocabulary


def class_vocabulary(name: str, prompt_names: str = "") -> Vocabulary:
    """The vocabulary a text classifier uses for a benchmark, one class per label value.

    Args:
        name: a name of ``list_benchmarks()``.
        prompt_names: "" = the catalog's class file (below); a set of ``prompt_name_sets()``
            (e.g. "sclip", "proxyclip") = that reference's class-name file for the benchmark,
            read as it is (its background line included). Custom datasets ignore it and use
            their own class file.

    Without a set, class 0 of a benchmark with a background class is named by its background
    words rather than the literal "background". A background word that is also a name of
    another class (COCO-Object's "bed") is left out of class 0: the vocabulary keeps a name in
    one class only, and the object class must keep it for its index to survive.

    Raises:
        DatasetError: unknown benchmark; a set that is unknown or has no file for the
            benchmark (the message lists the sets); a file whose class count differs from the
            benchmark's.
    """
    info = get_benchmark(name)
    prompt_names = str(prompt_names or "").strip()
    if prompt_names and not info.custom:
        return _prompt_vocabulary(info, prompt_names)
    vocabulary = _benchmark_classes(info)
    if not (info.has_background and info.background_words):
        return vocabulary
    others = vocabulary.classes[1:]
    taken = {n.casefold() for names in others for n in names}
    words = tuple(w for w in info.background_words if w.casefold() not in taken)
    return Vocabulary((words or ("background",), *others))


# --------------------------------------------------------------------------- custom datasets


def register_custom_dataset(
    name: str,
    image_dir: str | os.PathLike[str],
    label_dir: str | os.PathLike[str],
    class_file: str | os.PathLike[str],
    ignore_value: int = 255,
    image_ext: str = ".jpg",
    label_ext: str = ".png",
    root: str | os.PathLike[str] | None = None,
) -> BenchmarkInfo:
    """Register a folder of images and label files (same stem) under ``name``.

    Relative ``image_dir``, ``label_dir`` and ``class_file`` are resolved against the datasets
    root (``datasets_root(root)``) now. Label files hold class indices in the order of the class
    file (one class a line, synonyms separated by ``,``) and ``ignore_value`` where unlabeled;
    they are read without mapping. Registering a name again replaces the earlier entry.

    Returns:
        the new entry.

    Raises:
        DatasetError: ``name`` is empty or a built-in benchmark, the class file is missing or
            unreadable, or an argument is malformed.
    """
    name = str(name).strip()
    if not name:
        raise DatasetError("a custom dataset needs a name (datasets.custom[].name)")
    if name in BENCHMARKS:
        raise DatasetError(
            f"'{name}' is a built-in benchmark; give the custom dataset another name"
        )
    for what, ext in (("image_ext", image_ext), ("label_ext", label_ext)):
        if not str(ext).startswith("."):
            raise DatasetError(
                f"custom dataset '{name}': {what} '{ext}' must start with '.', e.g. '.png'"
            )
    if not isinstance(ignore_value, int | np.integer) or not 0 <= int(ignore_value) <= 65535:
        raise DatasetError(
            f"custom dataset '{name}': ignore_value {ignore_value!r} is not an integer in 0..65535"
        )
    for what, value in (
        ("image_dir", image_dir),
        ("label_dir", label_dir),
        ("class_file", class_file),
    ):
        if not str(value).strip():
            raise DatasetError(f"custom dataset '{name}' needs {what}")
    base = datasets_root(root)
    images = base / Path(image_dir).expanduser()
    labels = base / Path(label_dir).expanduser()
    classes = base / Path(class_file).expanduser()
    if not classes.is_file():
        raise DatasetError(f"class file {classes} of custom dataset '{name}' does not exist")
    try:
        vocabulary = _read_class_file(classes)
    except OvsegError as error:
        raise DatasetError(f"custom dataset '{name}': {error}") from error
    info = BenchmarkInfo(
        name=name,
        kind="sem_seg",
        class_file=classes,
        num_classes=vocabulary.num_classes,
        ignore_value=int(ignore_value),
        split="custom",
        image_dir=str(images),
        image_glob=f"*{image_ext}",
        image_suffix=str(image_ext),
        label_dir=str(labels),
        label_suffix=str(label_ext),
        description=f"custom dataset: images {images}, labels {labels}",
        custom=True,
    )
    _CUSTOM[name] = info
    return info


def unregister_custom_dataset(name: str) -> None:
    """Forget a custom dataset (no error if it was not registered); built-ins stay."""
    _CUSTOM.pop(name, None)


def _entry_value(entry: Any, key: str, default: Any) -> Any:
    if isinstance(entry, Mapping):
        return entry.get(key, default)
    return getattr(entry, key, default)


def register_from_config(cfg: Any) -> list[BenchmarkInfo]:
    """Register every entry of ``cfg.datasets.custom`` (see ``config.schema.CustomDatasetConfig``),
    resolving relative paths against ``cfg.datasets.root`` (or the default root).

    Returns:
        the registered entries, in config order.
    """
    datasets = cfg.datasets
    root = datasets.root or None
    registered = []
    for entry in datasets.custom or ():
        registered.append(
            register_custom_dataset(
                name=_entry_value(entry, "name", ""),
                image_dir=_entry_value(entry, "image_dir", ""),
                label_dir=_entry_value(entry, "label_dir", ""),
                class_file=_entry_value(entry, "class_file", ""),
                ignore_value=_entry_value(entry, "ignore_value", 255),
                image_ext=_entry_value(entry, "image_ext", ".jpg"),
                label_ext=_entry_value(entry, "label_ext", ".png"),
                root=root,
            )
        )
    return registered


# --------------------------------------------------------------------------- datasets


class SemSegDataset(Sequence[dict[str, Any]]):
    """The samples of a 2D semantic-segmentation benchmark, in a fixed (sorted) order.

    ``dataset[i]`` reads sample ``i``:
    ``image``: (H, W, 3) uint8 RGB; ``label``: (H, W) int64 class indices in
    ``[0, info.num_classes)`` or ``info.ignore_value``; ``image_path``, ``label_path``: str.
    """

    def __init__(self, info: BenchmarkInfo, samples: Sequence[tuple[Path, Path]]) -> None:
        self.info = info
        self._samples = list(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def _index(self, index: int) -> int:
        if not isinstance(index, int | np.integer):
            raise TypeError(f"dataset indices are integers, not {type(index).__name__}")
        n = len(self._samples)
        if not -n <= index < n:
            raise IndexError(f"sample {index} of '{self.info.name}', which has {n} samples")
        return int(index) % n

    def sample_paths(self, index: int) -> tuple[Path, Path]:
        """(image path, label path) of sample ``index``, without reading them."""
        return self._samples[self._index(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        image_path, label_path = self.sample_paths(index)
        image = read_image(image_path)
        label = read_label(
            label_path, self.info.label_mapping, self.info.ignore_value, self.info.num_classes
        )
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                f"{label_path} is {label.shape[1]}x{label.shape[0]} (width x height); the "
                "files do not belong together"
            )
        return {
            "image": image,
            "label": label,
            "image_path": str(image_path),
            "label_path": str(label_path),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"SemSegDataset('{self.info.name}', {len(self)} samples)"


def _missing(what: str, path: Path, info: BenchmarkInfo) -> DatasetError:
    source = "its registration" if info.custom else _README_HINT
    return DatasetError(f"{what} of '{info.name}' not found: expected {path}; {source}")


def _read_ids(path: Path, info: BenchmarkInfo) -> list[str]:
    if not path.is_file():
        raise _missing("the list of image ids", path, info)
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    ids = sorted({i for i in ids if i})
    if not ids:
        raise DatasetError(f"the list of image ids {path} of '{info.name}' is empty")
    return ids


def _strip_suffix(text: str, suffix: str) -> str:
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def find_samples(
    info: BenchmarkInfo, root: str | os.PathLike[str] | None = None
) -> list[tuple[Path, Path]]:
    """(image, label) paths of every sample of a benchmark, sorted by key.

    Raises:
        DatasetError: a folder or the id list is missing (the message names the exact path),
            no image is found, or an image has no label file.
    """
    base = datasets_root(root)
    image_dir = base / info.image_dir
    label_dir = base / info.label_dir
    for what, folder in (("image folder", image_dir), ("label folder", label_dir)):
        if not folder.is_dir():
            raise _missing(f"the {what}", folder, info)
    if info.id_list is not None:
        keys = _read_ids(base / info.id_list, info)
        images = [image_dir / f"{key}{info.image_suffix}" for key in keys]
        for image in images:
            if not image.is_file():
                raise DatasetError(
                    f"image {image} of '{info.name}' (listed in {base / info.id_list}) "
                    f"does not exist; {_README_HINT}"
                )
    else:
        images = sorted(p for p in image_dir.glob(info.image_glob) if p.is_file())
        if not images:
            raise DatasetError(
                f"no images matching '{info.image_glob}' in {image_dir} for '{info.name}'; "
                + ("check its registration" if info.custom else _README_HINT)
            )
        keys = [
            _strip_suffix(p.relative_to(image_dir).as_posix(), info.image_suffix) for p in images
        ]
    samples = []
    for key, image in zip(keys, images, strict=True):
        label = label_dir / f"{key}{info.label_suffix}"
        if not label.is_file():
            raise DatasetError(
                f"image {image} of '{info.name}' has no label file: expected {label}"
            )
        samples.append((image, label))
    return samples


def load_dataset(name: str, root: str | os.PathLike[str] | None = None) -> SemSegDataset:
    """The samples of a 2D benchmark or custom dataset under the datasets root.

    Args:
        name: a name of ``list_benchmarks()``.
        root: the datasets root; ``None`` or "" = ``$OVSEG_DATASETS`` or ``./datasets``.

    Raises:
        DatasetError: unknown name, a point-cloud benchmark, a missing folder or id list (the
            message names the exact path expected), an image without its label file.
    """
    info = get_benchmark(name)
    if info.kind != "sem_seg":
        raise DatasetError(
            f"'{name}' is a {info.kind.replace('_', '-')} benchmark; load_dataset reads 2D "
            "semantic-segmentation benchmarks only"
        )
    return SemSegDataset(info, find_samples(info, root))
