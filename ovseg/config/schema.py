"""The config schema: every key a config file may set, with its type and default.

Configs are OmegaConf structured configs built from these dataclasses, so a misspelt key or a
value of the wrong type is an error. Every number that a spec calls a default is a field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ovseg.config.engine_schema import DataLoaderConfig, SolverConfig


@dataclass
class ClipConfig:
    # an open_clip model name (ViT-B-16, ViT-L-14, ViT-H-14, ...) or ovseg's tiny test model
    arch: str = "ViT-B-16"
    # weights spec: open_clip pretrained tag, "hf-hub:org/name", a local file, or "random"
    weights: str = "openai"
    # positional embedding resize: "offset" (scale factor (g+0.1)/sqrt(N)) or "size" (target size)
    pos_embed_resize: str = "offset"
    # QuickGELU activations (OpenAI weights); None = as the open_clip pretrained tag says
    quick_gelu: Optional[bool] = None  # noqa: UP045 (OmegaConf needs Optional)
    # input mean/std: "openai" (CLIP's own) | "imagenet" (MaskCLIP's own evaluation protocol)
    normalize: str = "openai"


@dataclass
class DinoConfig:
    # a timm ViT name (vit_base_patch8_224.dino, vit_base_patch14_dinov2, ...) or "tiny-p8"
    arch: str = "vit_base_patch8_224.dino"
    weights: str = "timm"
    pos_embed_resize: str = "offset"


@dataclass
class SamConfig:
    # vit_b | vit_l | vit_h | tiny (the test size) | custom (the sizes below)
    arch: str = "vit_b"
    weights: str = ""  # a local SAM checkpoint file, or "random"
    # arch custom only (an error beside a named arch): the SAM's sizes; unset = vit_b's
    # (ovseg.encoders.sam.SamSize: input 1024, patch 16, window 14, prompt dim 256, ...)
    embed_dim: Optional[int] = None  # noqa: UP045 (OmegaConf needs Optional)
    depth: Optional[int] = None  # noqa: UP045
    num_heads: Optional[int] = None  # noqa: UP045
    global_attn_indexes: Optional[list[int]] = None  # noqa: UP045
    img_size: Optional[int] = None  # noqa: UP045
    patch_size: Optional[int] = None  # noqa: UP045
    window_size: Optional[int] = None  # noqa: UP045
    prompt_embed_dim: Optional[int] = None  # noqa: UP045
    mask_in_chans: Optional[int] = None  # noqa: UP045
    decoder_depth: Optional[int] = None  # noqa: UP045
    decoder_mlp_dim: Optional[int] = None  # noqa: UP045
    decoder_heads: Optional[int] = None  # noqa: UP045
    iou_head_hidden_dim: Optional[int] = None  # noqa: UP045


@dataclass
class InferenceConfig:
    short_side: int = 336
    max_long_side: int = 2048
    crop: int = 224  # 0 = the whole resized image in one window
    stride: int = 112
    window_batch: int = 8  # windows per forward: bounds memory, not the image size
    pad_multiple: int = 0  # zero-pad each window, centred, to a multiple of this (ProxyCLIP: 56)


@dataclass
class ModelConfig:
    """``cfg.model``: what every method has. The sections a method reads (its own settings and
    the shared ``clip``, ``dino``, ``sam``, ``inference``) are added per method by
    :func:`ovseg.config.method.config_class`, so a config holds only what its method reads."""

    name: str = "dense_clip"
    device: str = "cpu"
    # trained ovseg weights (a checkpoint's .safetensors) loaded before evaluation; "" = none
    weights: str = ""
    # fp32 | fp16 | bf16: dtype of the frozen image encoders (CLIP's image tower, DINO, SAM's
    # image encoder); CLIP's text tower and SAM's prompt encoder and mask decoder stay fp32
    precision: str = "fp32"
    # 2D methods refuse larger inputs with one line (0 = no limit); the default is PIL's
    # decompression-bomb limit (ovseg.data.image_io.DEFAULT_MAX_IMAGE_PIXELS, ~179 MP)
    max_image_pixels: int = 178_956_970


# the sections of cfg.model that several methods read, under one name each
SHARED_MODEL_SECTIONS: dict[str, type] = {
    "clip": ClipConfig,
    "dino": DinoConfig,
    "sam": SamConfig,
    "inference": InferenceConfig,
}


@dataclass
class TextConfig:
    # openai_imagenet (80) | maskclip (85: the 80 + 5 "... in the scene") | vild (14) | single
    templates: str = "openai_imagenet"
    cache_dir: str = ""  # "" = $OVSEG_CACHE or ~/.cache/ovseg
    # "" = the catalog's class names; "sclip" | "proxyclip" | "maskclip" = that reference's
    # class-name files (ovseg/data/classes/prompts/<set>/), which published numbers used
    prompt_names: str = ""


@dataclass
class CustomDatasetConfig:
    """A folder of images + label PNGs + a class file, registered by name without code."""

    name: str = ""
    image_dir: str = ""
    label_dir: str = ""
    class_file: str = ""
    ignore_value: int = 255
    image_ext: str = ".jpg"
    label_ext: str = ".png"


@dataclass
class DatasetsConfig:
    root: str = ""  # "" = $OVSEG_DATASETS or ./datasets
    test: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    custom: list[CustomDatasetConfig] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    absent_classes: str = "zero"  # zero (mmseg, detectron2 v0.6) | exclude (detectron2 main)
    save_predictions: bool = False
    # images per process between saves of the resumable evaluation state (--eval-only
    # --resume continues an interrupted evaluation from it); 0 = never save
    checkpoint_every: int = 50


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    output_dir: str = "./output"
    seed: int = 0
