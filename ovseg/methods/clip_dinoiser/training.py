"""CLIP-DINOiser's training: image-folder crops, teacher targets from DINO and FOUND, the loss.

Only the two heads train (spec "Training"); CLIP, the DINO ViT-B/16 teacher and FOUND (a DINO
ViT-S/8 and its trained 1x1-conv decoder) stay frozen.

data: a folder of images (ImageNet's class subfolders or flat) -> ``subset_size`` of them, drawn
with the run's seed, without duplicates unless ``with_replacement`` -> resize the short side to
``dataloader.crop_size``, random crop of that size, horizontal flip (p 0.5), brightness x
U(0.5, 1.5); images stay in [0, 1] (each network normalises its own input).
targets, from the very crop the heads see, on CLIP's patch grid (28 x 28 at 448):
  correlation: DINO ViT-B/16 last-block values (heads concatenated, class token dropped,
  L2-normalised), patch cosine >= 0.2;
  background: DINO ViT-S/8 last-block keys -> FOUND decoder -> sigmoid -> resized (bilinear)
  from its grid to CLIP's -> > 0.5.
loss: BCE-with-logits of the correlation head's patch cosines (negatives clamped to 0) against
the correlation target + BCE-with-logits of the background head's logits against the
background target, both means, summed unweighted.

The teachers are built for training only and are not submodules of the model, so no
checkpoint ever holds them. Their targets may be cached on disk (``target_cache_dir``), keyed
by the image file, the augmentation drawn for it and the teachers' weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from ovseg.config.schema import DinoConfig
from ovseg.data.image_io import read_image
from ovseg.errors import ConfigError, DatasetError, ImageReadError
from ovseg.io import ArrayCache

logger = logging.getLogger(__name__)

# the extensions torchvision's ImageFolder lists (any case), so a drawn index names the same
# file as in the reference's ImageFolder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BRIGHTNESS = 0.5  # ColorJitter(brightness=0.5): factor ~ U(1 - 0.5, 1 + 0.5)
FLIP_PROBABILITY = 0.5
CACHE_FORMAT = "ovseg-dinoiser-targets/1"


# --------------------------------------------------------------------------- data


def list_image_folder(root: str | os.PathLike[str]) -> list[Path]:
    """The image files of ``root`` in torchvision ImageFolder's order.

    With subfolders (ImageNet's ``train/<wnid>/*.JPEG``): the classes sorted by name, each
    walked recursively in sorted order; files directly under ``root`` are then ignored, as
    ImageFolder does. Without subfolders: the files of ``root`` sorted by name.

    Raises:
        DatasetError: ``root`` is not a folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"training image folder {root} does not exist or is not a folder; "
                           "set model.clip_dinoiser.image_dir")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        return sorted(p for p in root.iterdir() if p.is_file() and _is_image(p.name))
    files = []
    for name in classes:
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            files.extend(Path(folder) / n for n in sorted(names) if _is_image(n))
    return files


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def draw_subset(count: int, subset_size: int, with_replacement: bool, seed: int) -> np.ndarray:
    """Indices of the training subset among ``count`` images.

    ``with_replacement`` reproduces the reference, ``np.random.choice(count, subset_size)``
    after ``np.random.seed(seed)`` (duplicates possible); otherwise ``subset_size`` distinct
    indices from the same seed (all ``count`` when there are fewer). ``subset_size`` 0 = every
    image once, in order.

    Returns:
        (K,) int64.
    """
    if subset_size < 0:
        raise ConfigError(f"model.clip_dinoiser.subset_size must be >= 0, got {subset_size}")
    if subset_size == 0 or count == 0:
        return np.arange(count, dtype=np.int64)
    rng = np.random.RandomState(seed % (1 << 32))
    if with_replacement:
        return rng.choice(count, subset_size).astype(np.int64)
    if subset_size >= count:
        logger.info("subset_size %d >= the %d images of the folder: training on all of them",
                    subset_size, count)
        return np.arange(count, dtype=np.int64)
    return rng.choice(count, subset_size, replace=False).astype(np.int64)


def keep_readable(files: Sequence[Path], where: str) -> list[Path]:
    """The files that decode as images; one warning line for each that does not.

    Raises:
        DatasetError: none decodes.
    """
    readable, checked = [], {}
    for path in files:
        if path not in checked:
            try:
                read_image(path)
                checked[path] = True
            except ImageReadError as exc:
                logger.warning("skipping %s", " ".join(str(exc).split()))
                checked[path] = False
        if checked[path]:
            readable.append(path)
    if not readable:
        raise DatasetError(f"no readable training image in {where} ({len(checked)} files tried; "
                           "see the warnings above)")
    return readable


@dataclass(frozen=True)
class Augmentation:
    """One draw of the training augmentation for an image resized to ``resized`` (h, w):
    crop ``crop`` x ``crop`` at (``top``, ``left``), then flip, then brightness x ``brightness``.
    """

    resized: tuple[int, int]
    top: int
    left: int
    crop: int
    flip: bool
    brightness: float

    @staticmethod
    def draw(resized: tuple[int, int], crop: int, rng: np.random.Generator | None) -> Augmentation:
        """Random parameters as torchvision's RandomCrop / RandomHorizontalFlip / ColorJitter
        draw them; from ``rng`` when given, else from torch's global RNG (seeded per loader
        worker by the engine)."""
        h, w = resized
        if rng is None:
            top = int(torch.randint(0, h - crop + 1, (1,)))
            left = int(torch.randint(0, w - crop + 1, (1,)))
            flip = bool(torch.rand(1) < FLIP_PROBABILITY)
            brightness = float(torch.empty(1).uniform_(1 - BRIGHTNESS, 1 + BRIGHTNESS))
        else:
            top = int(rng.integers(0, h - crop + 1))
            left = int(rng.integers(0, w - crop + 1))
            flip = bool(rng.random() < FLIP_PROBABILITY)
            brightness = float(np.float32(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)))
        return Augmentation(resized, top, left, crop, flip, brightness)

    def apply(self, image: Tensor) -> Tensor:
        """(3, h, w) float in [0, 1], already resized -> (3, crop, crop) float in [0, 1]."""
        out = image[:, self.top:self.top + self.crop, self.left:self.left + self.crop]
        if self.flip:
            out = out.flip(-1)
        # torchvision's adjust_brightness: blend with black, clamped to [0, 1]
        return (out * self.brightness).clamp(0.0, 1.0)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision Resize(int): the short side to ``short_side``, the long one scaled and
    truncated."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


class ImageFolderCrops(Sequence[dict[str, Any]]):
    """Augmented training crops of a list of image files.

    ``crops[i]``: ``image`` (3, S, S) float32 in [0, 1] (not normalised) and ``key`` (str):
    what identifies that crop's teacher targets (the file, its size and modification time,
    the augmentation; :func:`target_key` adds the teachers).

    Args:
        files: the images, one sample each (a file listed twice is two samples).
        crop_size: S, also the short side images are resized to.
        variants: 0 = a fresh augmentation at every read; N > 0 = each file's augmentation is
            one of N fixed draws (seeded by ``seed``, the file name and the draw), so that its
            teacher targets repeat and a target cache pays off.
        seed: seeds the fixed draws.
        root: file names in keys are relative to it.
    """

    def __init__(self, files: Sequence[Path], crop_size: int, *, variants: int = 0,
                 seed: int = 0, root: str | os.PathLike[str] | None = None) -> None:
        if crop_size <= 0:
            raise ConfigError(f"dataloader.crop_size must be positive, got {crop_size}")
        if variants < 0:
            raise ConfigError(f"model.clip_dinoiser.augment_variants must be >= 0, got {variants}")
        self.files = list(files)
        self.crop_size = crop_size
        self.variants = variants
        self.seed = seed
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def _name(self, path: Path) -> str:
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.as_posix()

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        path = self.files[index]
        image = torch.tensor(read_image(path)).permute(2, 0, 1).float() / 255.0  # ToTensor
        size = resized_size(image.shape[1], image.shape[2], self.crop_size)
        # guess: torchvision's default antialias of the installed version (True since 0.17); the
        # reference's Resize on tensors ran on an unpinned torchvision
        image = TF.resize(image, list(size))
        name = self._name(path)
        rng = None
        if self.variants:
            variant = int(torch.randint(0, self.variants, (1,)))
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), variant])
        augmentation = Augmentation.draw(size, self.crop_size, rng)
        stat = path.stat()
        key = json.dumps({"file": name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                          "augmentation": augmentation.__dict__}, sort_keys=True)
        return {"image": augmentation.apply(image).contiguous(), "key": key}


# --------------------------------------------------------------------------- targets


def _tokens_to_map(tokens: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """(B, heads, T, head_dim) per-head tokens -> (B, heads x head_dim, h, w), prefix dropped."""
    b, heads, _, head_dim = tokens.shape
    patches = tokens[:, :, num_prefix_tokens:].permute(0, 2, 1, 3).reshape(b, -1, heads * head_dim)
    return patches.transpose(1, 2).reshape(b, heads * head_dim, *grid)


def correlation_target(values: Tensor, num_prefix_tokens: int, threshold: float) -> Tensor:
    """The correlation target from a DINO last block's values.

    Args:
        values: (B, heads, T, head_dim) v of the last block (T = prefix + N patch tokens).

    Returns:
        (B, N, N) float32 in {0, 1}: 1 where the cosine of two patches' L2-normalised values
        (heads concatenated) is >= ``threshold`` (``target_corr_threshold``, 0.2; the reference
        zeroes entries < threshold and takes what stays > 0).
    """
    b, heads, _, head_dim = values.shape
    patches = values[:, :, num_prefix_tokens:].permute(0, 2, 1, 3).reshape(b, -1, heads * head_dim)
    patches = F.normalize(patches.float(), dim=-1)
    cosine = patches @ patches.transpose(1, 2)
    return (cosine >= threshold).float()


def background_target(found_logits: Tensor, grid: tuple[int, int], threshold: float) -> Tensor:
    """The background target from FOUND's decoder.

    Args:
        found_logits: (B, 1, h8, w8) FOUND logits on the DINO ViT-S/8 grid.
        grid: CLIP's patch grid (h, w).

    Returns:
        (B, 1, h, w) float32 in {0, 1}: sigmoid, resized to ``grid`` as torchvision's resize
        does by default (bilinear), then > ``threshold`` (``found_threshold``, 0.5; 1 =
        foreground).
    """
    saliency = torch.sigmoid(found_logits.float())
    return (TF.resize(saliency, list(grid)) > threshold).float()


def correlation_logits(projected: Tensor) -> Tensor:
    """The correlation head's logits: patch cosines of its output, negatives clamped to 0.

    Args:
        projected: (B, C, h, w) correlation-head output.

    Returns:
        (B, N, N), N = h * w; in [0, 1], so sigmoid(logit) stays in [0.5, 0.73] (the reference).
    """
    from ovseg.modeling.dinoiser_heads import patch_cosines

    return patch_cosines(projected).clamp(min=0.0)


def _teacher_section(arch: str, weights: str) -> DinoConfig:
    # DINO's own code resizes positions with its +0.1 offset rule, as does FOUND's
    return DinoConfig(arch=arch, weights=weights, pos_embed_resize="offset")



class Teachers:
    """The frozen teachers of one run (not an ``nn.Module``: never in the model's state dict).

    Args:
        dino_settings: ``model.dino``, the correlation teacher (DINO ViT-B/16).
        settings: ``model.clip_dinoiser`` (FOUND's backbone and decoder file, thresholds).

    Attributes:
        dino: DINO ViT-B/16 (correlation target).
        found_dino: DINO ViT-S/8, and found: FOUND's decoder on its last-block keys.
        digest: sha256 of the teachers' weights and the target settings (cache keys).
    """

    def __init__(self, dino_settings, settings, device: torch.device) -> None:
        from ovseg.encoders import build_dino
        from ovseg.modeling.found import load_found_decoder

        found_file = str(settings.found_weights).strip()
        if not found_file or not Path(found_file).expanduser().is_file():
            # a missing FOUND file is reported (one line, naming its key) before any ViT is built
            load_found_decoder(found_file)
        self.dino = build_dino(dino_settings, device)
        self.found_dino = build_dino(
            _teacher_section(settings.found_dino_arch, settings.found_dino_weights), device
        )
        self.found = load_found_decoder(found_file, self.found_dino.embed_dim)
        self.found.to(device).eval().requires_grad_(False)
        self.corr_threshold = float(settings.target_corr_threshold)
        self.found_threshold = float(settings.found_threshold)
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            hasher = hashlib.sha256(CACHE_FORMAT.encode())
            hasher.update(repr((self.corr_threshold, self.found_threshold)).encode())
            for module in (self.dino, self.found_dino, self.found):
                for name, tensor in sorted(module.state_dict().items()):
                    hasher.update(name.encode())
                    hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._digest = hasher.hexdigest()
        return self._digest

    def _input(self, encoder, images: Tensor) -> Tensor:
        mean = encoder.mean.view(1, 3, 1, 1)
        std = encoder.std.view(1, 3, 1, 1)
        return (images.to(mean.device, torch.float32) - mean) / std

    @torch.no_grad()
    def targets(self, images: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Both targets of (B, 3, S, S) images in [0, 1] on CLIP's patch ``grid``.

        Returns:
            correlation (B, N, N) and background (B, 1, h, w), float32 in {0, 1}.

        Raises:
            ConfigError: the DINO teacher's grid is not CLIP's.
        """
        with torch.autocast(images.device.type, enabled=False):
            dino = self.dino(self._input(self.dino, images), last_qkv=True)
            if tuple(dino.grid) != tuple(grid):
                raise ConfigError(
                    f"the DINO teacher's patch grid {dino.grid} on {tuple(images.shape[-2:])} "
                    f"crops differs from CLIP's {tuple(grid)}: use a teacher with CLIP's patch "
                    "size (model.clip_dinoiser.teacher_arch) or another dataloader.crop_size"
                )
            correlation = correlation_target(dino.v, dino.num_prefix_tokens, self.corr_threshold)
            found = self.found_dino(self._input(self.found_dino, images), last_qkv=True)
            keys = _tokens_to_map(found.k, found.num_prefix_tokens, found.grid)
            background = background_target(self.found(keys.float()), grid, self.found_threshold)
        return correlation, background


class TargetCache(ArrayCache):
    """Teacher targets on disk, one file per crop (:class:`ovseg.io.ArrayCache`), keyed by
    the crop under the teachers' digest: a changed image file or other teacher weights give
    another name, so stale targets are never read. Stored as bits."""

    def __init__(self, directory: str | os.PathLike[str], digest: str) -> None:
        super().__init__(directory, digest, what="target cache")

    def load(self, key: str) -> tuple[Tensor, Tensor] | None:  # type: ignore[override]
        return super().load(key, _unpack_targets)

    def save(self, key: str, correlation: Tensor, background: Tensor) -> None:  # type: ignore[override]
        n = correlation.shape[-1]
        h, w = background.shape[-2:]
        super().save(
            key, shape=np.array([n, h, w]),
            correlation=np.packbits(correlation.detach().cpu().numpy().astype(bool).ravel()),
            background=np.packbits(background.detach().cpu().numpy().astype(bool).ravel()),
        )


def _unpack_targets(stored) -> tuple[Tensor, Tensor]:
    """The (N, N) correlation and (1, h, w) background targets of a stored entry."""
    n, h, w = (int(v) for v in stored["shape"])
    correlation = np.unpackbits(stored["correlation"], count=n * n).reshape(n, n)
    background = np.unpackbits(stored["background"], count=h * w).reshape(1, h, w)
    return (torch.from_numpy(correlation.astype(np.float32)),
            torch.from_numpy(background.astype(np.float32)))


# --------------------------------------------------------------------------- model hooks

_TEACHERS = "_dinoiser_teachers"  # attribute of the model holding its Teachers (not a module)
_CACHE = "_dinoiser_target_cache"


def teachers_of(model: nn.Module, cfg=None) -> Teachers:
    """The model's teachers on its heads' device: built at first use from the model's own
    settings, or (re)built from ``cfg`` (``model.dino``, ``model.clip_dinoiser``) when given."""
    teachers = model.__dict__.get(_TEACHERS)
    if teachers is None or cfg is not None:
        device = next(model.heads.parameters()).device
        if cfg is None:
            teachers = Teachers(model.dino_settings, model.settings, device)
        else:
            teachers = Teachers(cfg.model.dino, cfg.model.clip_dinoiser, device)
        # plain attributes: nn.Module registers modules, not other objects, so the teachers
        # stay out of state_dict(), parameters() and every checkpoint
        object.__setattr__(model, _TEACHERS, teachers)
        model.__dict__.pop(_CACHE, None)
    return teachers


def _target_cache(model: nn.Module, directory: str | None = None) -> TargetCache | None:
    """The model's target cache (None = off): set from ``directory`` when given, else the one
    set before, else from the model's own ``target_cache_dir``."""
    if directory is None and _CACHE in model.__dict__:
        return model.__dict__[_CACHE]
    if directory is None:
        directory = str(model.settings.target_cache_dir or "")
    cache = TargetCache(directory, teachers_of(model).digest) if directory else None
    object.__setattr__(model, _CACHE, cache)
    return cache


def batch_targets(model: nn.Module, images: Tensor, keys: Sequence[str] | None,
                  grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The targets of a batch: from the cache where it has them, the teachers for the rest
    (then cached). (B, N, N) and (B, 1, h, w) float32 on the images' device."""
    cache = _target_cache(model) if keys is not None else None
    if cache is None:
        return teachers_of(model).targets(images, grid)
    found = [cache.load(key) for key in keys]
    missing = [i for i, hit in enumerate(found) if hit is None]
    if missing:
        correlation, background = teachers_of(model).targets(images[missing], grid)
        for row, i in enumerate(missing):
            cache.save(keys[i], correlation[row], background[row])
            found[i] = (correlation[row], background[row])
    correlation = torch.stack([c for c, _ in found]).to(images.device)
    background = torch.stack([b for _, b in found]).to(images.device)
    return correlation, background


def dinoiser_loss(model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
    """The training loss of a batch (spec "Training").

    Args:
        batch: ``image`` (B, 3, S, S) float in [0, 1]; ``key`` (B strings, for the cache).

    Returns:
        ``loss_correlation`` and ``loss_background``, scalar means; the engine sums them.
    """
    heads = model.heads
    device = next(heads.parameters()).device
    images = batch["image"].to(device, torch.float32)
    with torch.no_grad():
        _, ln2 = model.head_inputs(model.clip.normalize(images * 255.0))
    grid = (int(ln2.shape[-2]), int(ln2.shape[-1]))
    correlation_target_, background_target_ = batch_targets(model, images, batch.get("key"),
                                                            grid)
    logits = correlation_logits(heads.correlation_features(ln2))
    background = heads.background_logits(ln2).float()
    return {
        "loss_correlation": F.binary_cross_entropy_with_logits(logits, correlation_target_),
        "loss_background": F.binary_cross_entropy_with_logits(background, background_target_),
    }


def train_image_folder(cfg) -> Path:
    """``model.clip_dinoiser.image_dir``, relative to ``datasets.root`` unless absolute."""
    from ovseg.data.catalog import datasets_root

    folder = str(cfg.model.clip_dinoiser.image_dir or "")
    if not folder:
        raise ConfigError("model.clip_dinoiser.image_dir is not set: the folder of training "
                          "images (e.g. imagenet/train under datasets.root, or an absolute path)")
    path = Path(folder).expanduser()
    return path if path.is_absolute() else datasets_root(cfg.datasets.root or None) / path


def build_train_dataset(model: nn.Module, cfg) -> ImageFolderCrops:
    """The training crops of ``cfg`` (see the module docstring); builds the teachers first, so
    that a missing teacher weights file stops the run before any data is read."""
    settings = cfg.model.clip_dinoiser
    teachers_of(model, cfg)
    _target_cache(model, str(settings.target_cache_dir or ""))
    folder = train_image_folder(cfg)
    files = list_image_folder(folder)
    if not files:
        raise DatasetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    indices = draw_subset(len(files), int(settings.subset_size), bool(settings.with_replacement),
                          int(cfg.seed))
    chosen = keep_readable([files[i] for i in indices], str(folder))
    logger.info("CLIP-DINOiser training set: %d images of %d in %s (%s)", len(chosen),
                len(files), folder,
                "drawn with replacement" if settings.with_replacement else "distinct")
    return ImageFolderCrops(chosen, int(cfg.dataloader.crop_size),
                            variants=int(getattr(settings, "augment_variants", 0)),
                            seed=int(cfg.seed), root=folder)


def param_groups(model: nn.Module, solver) -> list[dict[str, Any]]:
    """The two optimizer groups, named for ``solver.param_groups``: ``correlation`` (the reference
    trains it at 5e-5) and ``background`` (1e-2)."""
    return [
        {"name": "correlation", "params": list(model.heads.correlation.parameters())},
        {"name": "background", "params": list(model.heads.background.parameters())},
    ]
