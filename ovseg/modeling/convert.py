"""Checkpoint formats: the authors' released files -> ovseg weight files (safetensors + config).

One registry, :data:`FORMATS`, names each released file ovseg reads and drives the key map
that already loads it (every map lives beside its network; nothing is mapped twice):

============= ========================================= =====================================
format        the authors' file                         ovseg output, loaded by
============= ========================================= =====================================
clip_dinoiser CLIP-DINOiser ``checkpoints/last.pt``     ``heads.*``: model.clip_dinoiser.heads
found         FOUND ``data/weights/decoder_weights.pt`` model.clip_dinoiser.found_weights
ovseg         OVSeg ``ovseg_R101c_vitB16_ft_mpt.pth``,  ``proposals.*``, ``prompts.*``:
              ``ovseg_swinbase_vitL14_ft_mpt.pth``      model.mask_adapted.trained_weights;
                                                        ``.clip``: model.clip.weights
ovseg_clip    OVSeg's fine-tuned (mask-prompt) CLIP     model.clip.weights (+ ``.prompts``)
clip2scene    CLIP2Scene's MinkowskiEngine MinkUNet14A  ``student.*``: model.weights
dino          DINO ``dino_deitsmall8_pretrain.pth``,    timm ViT: model.dino.weights
              ``dino_vitbase8_pretrain.pth``,
              ``dino_vitbase16_pretrain.pth``
sam           SAM ``sam_vit_{b,l,h}_*.pth``             model.sam.weights
============= ========================================= =====================================

A conversion reads the file with ``torch.load(weights_only=True)`` (or safetensors; a pickle
holding code is refused), gives every tensor its home through the map (a key of the network,
or a documented drop: a training constant, a classifier ovseg has no use for) and checks the
result against the network built on the meta device: nothing left over, nothing missing, every
shape right. Anything else is one :class:`~ovseg.errors.WeightsError` line listing the keys by
the file's names. Without ``arch`` the architecture is the one the file fits.

It writes ``OUTPUT`` (``.safetensors``), any further part beside it (``OUTPUT``'s stem +
``.clip.safetensors``, ...) and ``OUTPUT``'s stem + ``.yaml``: the config keys that load them,
to merge into a config of the method or to pass as ``KEY VALUE`` overrides::

    result = convert_checkpoint("sam", "sam_vit_b_01ec64.pth", "sam_vit_b.safetensors")
    print(result.report())
    cfg = ovseg.get_config("trident/trident_vitb16.yaml", result.overrides)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ovseg.errors import WeightsError
from ovseg.io import atomic_path, atomic_write_text, sha256_file
from ovseg.modeling.files import read_tensor_file

LISTED = 20  # keys named per kind of problem in an error
SNIPPET_SUFFIX = ".yaml"
FILE_FORMAT = "ovseg.convert"  # safetensors metadata "format" prefix

__all__ = [
    "FORMATS",
    "CheckpointFormat",
    "Conversion",
    "Part",
    "convert_checkpoint",
    "get_format",
    "read_checkpoint",
]


# --------------------------------------------------------------------------- results


@dataclass
class Part:
    """One output file: tensors under ovseg's names and the config key that loads it.

    suffix: "" = OUTPUT itself; ".clip" = OUTPUT's stem + ".clip.safetensors".
    sources: ovseg key -> the file's key it came from.
    """

    suffix: str
    config_key: str
    tensors: dict[str, Tensor]
    sources: dict[str, str]
    path: Path | None = None  # where it was written


@dataclass
class Conversion:
    """What a format made of one file.

    dropped: the file's keys that are not weights of the network, with the reason.
    settings: config keys (beside the weight paths) the loading config needs, with values.
    notes: what the loading config must also fit (e.g. the CLIP a head width implies).
    """

    format: str
    arch: str
    parts: list[Part]
    dropped: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: str = ""
    source_sha256: str = ""
    snippet: Path | None = None  # the config YAML, once written

    def config_values(self) -> dict[str, Any]:
        """Dotted config key -> value: the settings, then each written part's path."""
        values = dict(self.settings)
        for part in self.parts:
            values[part.config_key] = str(part.path) if part.path else f"<{part.suffix or 'out'}>"
        return values

    @property
    def overrides(self) -> list[str]:
        """The config as ``KEY VALUE`` overrides (``ovseg.get_config(name, overrides)``,
        trailing arguments of ``tools/train_net.py``)."""
        pairs: list[str] = []
        for key, value in self.config_values().items():
            pairs += [key, _yaml_scalar(value)]
        return pairs

    def config(self) -> dict[str, Any]:
        """The config values as a nested mapping (the ``.yaml`` snippet)."""
        nested: dict[str, Any] = {}
        for key, value in self.config_values().items():
            *parents, leaf = key.split(".")
            node = nested
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
        return nested

    def report(self) -> str:
        """The shapes table: every tensor's file key, ovseg key, shape and dtype, per output
        file; the dropped keys; where the files went and how to load them."""
        tables = [[(part.sources.get(key, "-"), key, _shape(value), _dtype(value))
                   for key, value in part.tensors.items()] for part in self.parts]
        header = ("file key", "ovseg key", "shape", "dtype")
        widths = [max(len(row[i]) for table in [[header], *tables] for row in table)
                  for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

        lines = [f"format {self.format}, arch {self.arch}, from {self.source}"]
        for part, table in zip(self.parts, tables, strict=True):
            lines.append(f"{part.path or part.suffix or 'output'}: {len(table)} tensors, "
                         f"loaded by {part.config_key}")
            lines += [line(header), *(line(row) for row in table)]
        lines += [f"dropped {key}: {why}" for key, why in self.dropped.items()]
        lines += [f"note: {note}" for note in self.notes]
        if self.snippet:
            lines.append(f"config: {self.snippet}")
        lines.append("load with: " + " ".join(self.overrides))
        return "\n".join(lines)


def _shape(value: Tensor) -> str:
    return str(tuple(value.shape))


def _dtype(value: Tensor) -> str:
    return str(value.dtype).removeprefix("torch.")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, wrappers: tuple[str, ...] = (), expected: str = ""
                    ) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from the first of ``wrappers`` it holds.

    Torch files are read with ``torch.load(weights_only=True)`` on the CPU, so no code in a
    pickle runs; ``.safetensors`` files with safetensors. Entries beside the wrapper (an
    ``epoch`` counter, an optimizer) are ignored. ``expected`` (what the file should be) ends
    the error of a file that is not a dict of tensors.

    Raises:
        WeightsError: one line: the file is missing or unreadable, holds pickled code or
            objects, or (after unwrapping) is not a flat dict of tensors.
    """
    return read_tensor_file(path, wrappers=wrappers, expected=expected)


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
    return ", ".join(keys[:LISTED]) + more


# --------------------------------------------------------------------------- checking


class _Mismatch(Exception):
    """A file that does not fit one arch: the problems and how many keys they concern."""

    def __init__(self, arch: str, problems: list[str], count: int):
        super().__init__("; ".join(problems))
        self.arch, self.problems, self.count = arch, problems, count


class _Checker:
    """Collects what keeps mapped tensors from fitting the expected state dicts."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.count = 0

    def check(self, what: str, expected: Mapping[str, Tensor], tensors: Mapping[str, Tensor],
              sources: Mapping[str, str], theirs: Callable[[str], str] = str,
              unmatched: Sequence[str] = ()) -> None:
        """Check ``tensors`` (ovseg keys) against ``expected``; keys are named as the file
        names them: ``sources`` for present keys, ``theirs(key)`` for missing ones;
        ``unmatched`` are file keys the map gave no home."""
        missing = sorted(theirs(k) for k in expected if k not in tensors)
        unexpected = sorted([*unmatched, *(sources.get(k, k) for k in tensors
                                           if k not in expected)])
        wrong = sorted(f"{sources.get(k, k)} (file {_shape(v)}, expected "
                       f"{_shape(expected[k])})" for k, v in tensors.items()
                       if k in expected and tuple(v.shape) != tuple(expected[k].shape))
        parts = [f"{label}: {_names(keys)}" for label, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("shape mismatches", wrong)) if keys]
        if parts:
            self.problems.append(f"{what}: " + "; ".join(parts) if what else "; ".join(parts))
            self.count += len(missing) + len(unexpected) + len(wrong)

    def done(self, arch: str) -> None:
        if self.problems:
            raise _Mismatch(arch, self.problems, self.count)


def _map_keys(state: Mapping[str, Tensor], rename: Callable[[str], str | None],
              ) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """(tensors by ovseg key, ovseg key -> file key, file keys without a home): ``rename``
    gives a file key's ovseg key or None; a second key with the same home has none."""
    tensors: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        name = rename(key)
        if name is None or name in tensors:
            unmatched.append(key)
            continue
        tensors[name] = value
        sources[name] = key
    return tensors, sources, unmatched


def _strip_common_prefix(state: Mapping[str, Tensor], prefixes: tuple[str, ...]
                         ) -> dict[str, Tensor]:
    """Drop a prefix every key has (``module.`` of DDP files), repeatedly."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def _prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in state.items()}


def _meta_state(build: Callable[[], torch.nn.Module]) -> dict[str, Tensor]:
    """The state dict of a network built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build().state_dict()


# --------------------------------------------------------------------------- formats


Converter = Callable[[dict[str, Tensor], "str | None", str], Conversion]


@dataclass(frozen=True)
class CheckpointFormat:
    """One released file kind and the map that converts it.

    files: the authors' file names; loads_into: what ovseg loads the result as;
    archs: the released architectures (empty when the file sets its own sizes);
    test_archs: tiny architectures of the tests, accepted and tried too;
    wrappers: keys a file may wrap its state dict in.
    """

    name: str
    files: str
    loads_into: str
    archs: tuple[str, ...]
    test_archs: tuple[str, ...]
    wrappers: tuple[str, ...]
    convert: Converter

    @property
    def all_archs(self) -> tuple[str, ...]:
        return self.archs + self.test_archs


def _fit(fmt_name: str, archs: tuple[str, ...], arch: str | None, source: str, files: str,
         attempt: Callable[[str], Conversion]) -> Conversion:
    """``attempt(arch)``, or the first arch of ``archs`` that fits; one error line otherwise."""
    if arch is not None:
        try:
            return attempt(arch)
        except _Mismatch as mismatch:
            raise WeightsError(f"checkpoint {source} does not fit {fmt_name} arch {arch}: "
                               f"{mismatch}; expected {files}") from None
    closest: _Mismatch | None = None
    for candidate in archs:
        try:
            return attempt(candidate)
        except _Mismatch as mismatch:
            if closest is None or mismatch.count < closest.count:
                closest = mismatch
    assert closest is not None
    raise WeightsError(
        f"checkpoint {source} fits no {fmt_name} arch ({', '.join(archs)}); the closest, "
        f"{closest.arch}: {closest}; expected {files} (--arch picks one)"
    )


# ---- CLIP-DINOiser heads -------------------------------------------------------------------

_DINOISER_FILES = "CLIP-DINOiser's checkpoints/last.pt ({'epoch', 'model_state_dict'})"


def _convert_dinoiser_heads(state: dict[str, Tensor], arch: str | None,
                            source: str) -> Conversion:
    from ovseg.modeling.dinoiser_heads import (
        HEADS_CONFIG_KEY,
        HEADS_PREFIX,
        REFERENCE_NAMES,
        DinoiserHeads,
    )

    state = _strip_common_prefix(state, ("module.",))

    def rename(key: str) -> str | None:
        for theirs, ours in REFERENCE_NAMES.items():
            if key.startswith(theirs):
                return HEADS_PREFIX + ours + key[len(theirs):]
        return None

    def theirs(key: str) -> str:
        bare = key[len(HEADS_PREFIX):]
        for authors, ours in REFERENCE_NAMES.items():
            if bare.startswith(ours):
                return authors + bare[len(ours):]
        return key

    tensors, sources, unmatched = _map_keys(state, rename)
    weight = state.get("obj_proj.weight")
    in_dim, proj_dim = 768, 256  # ViT-B/16's heads, when the file cannot say
    if weight is not None and weight.dim() == 4:
        proj_dim, in_dim = int(weight.shape[0]), int(weight.shape[1])
    checker = _Checker()
    expected = _prefixed(_meta_state(lambda: DinoiserHeads(in_dim, proj_dim)), HEADS_PREFIX)
    checker.check("", expected, tensors, sources, theirs, unmatched)
    try:
        checker.done("heads")
    except _Mismatch as mismatch:
        raise WeightsError(f"checkpoint {source} is not {_DINOISER_FILES} with the 4 head "
                           f"tensors obj_proj.weight/bias, bkg_decoder.weight/bias: "
                           f"{mismatch}") from None
    return Conversion(
        "clip_dinoiser", f"heads {in_dim} -> {proj_dim}",
        [Part("", HEADS_CONFIG_KEY, tensors, sources)],
        settings={"model.name": "clip_dinoiser", "model.clip_dinoiser.proj_dim": proj_dim},
        notes=[f"the heads read a CLIP of width {in_dim} (768: ViT-B/16)"],
    )


# ---- FOUND decoder -------------------------------------------------------------------------

_FOUND_FILES = "FOUND's data/weights/decoder_weights.pt ({'decoder': {'weight', 'bias'}})"


def _convert_found(state: dict[str, Tensor], arch: str | None, source: str) -> Conversion:
    from ovseg.modeling.found import FOUND_CONFIG_KEY, FoundDecoder

    state = _strip_common_prefix(state, ("module.", "decoder."))
    tensors, sources, unmatched = _map_keys(
        state, lambda key: key if key in ("weight", "bias") else None)
    weight = state.get("weight")
    in_dim = int(weight.shape[1]) if weight is not None and weight.dim() == 4 else 384
    checker = _Checker()
    checker.check("", _meta_state(lambda: FoundDecoder(in_dim).decoder), tensors, sources,
                  unmatched=unmatched)
    try:
        checker.done("decoder")
    except _Mismatch as mismatch:
        raise WeightsError(f"checkpoint {source} is not {_FOUND_FILES}: {mismatch}") from None
    return Conversion(
        "found", f"1x1 conv {in_dim} -> 1", [Part("", FOUND_CONFIG_KEY, tensors, sources)],
        settings={"model.name": "clip_dinoiser"},
        notes=[f"FOUND's decoder reads the {in_dim}-d keys of DINO ViT-S/8 "
               "(model.clip_dinoiser.found_dino_arch)"],
    )


# ---- OVSeg ---------------------------------------------------------------------------------

_OVSEG_FILES = ("the authors' OVSeg checkpoint (ovseg_R101c_vitB16_ft_mpt.pth or "
                "ovseg_swinbase_vitL14_ft_mpt.pth, {'model': ...})")
_OVSEG_CLIP_FILES = ("OVSeg's fine-tuned CLIP in OpenAI's key layout (visual.*, transformer.*, "
                     "token_embedding, ...), with visual.mask_embedding when mask-prompt tuned")
# proposal backbone -> the CLIP it is released with
OVSEG_CLIPS = {"r101c": "ViT-B-16", "swin_b": "ViT-L-14", "tiny": "ovseg-tiny-ViT-16"}
PROMPTS_KEY = "prompts.mask_embedding"
TRAINED_WEIGHTS_KEY = "model.mask_adapted.trained_weights"


def _proposal_builder(arch: str) -> Callable[..., torch.nn.Module]:
    from ovseg.modeling.mask_proposal import (
        build_r101c_proposal_network,
        build_swin_b_proposal_network,
        build_tiny_proposal_network,
    )

    builders = {"r101c": build_r101c_proposal_network, "swin_b": build_swin_b_proposal_network,
                "tiny": build_tiny_proposal_network}
    if arch not in builders:
        raise WeightsError(f"unknown OVSeg proposal arch {arch!r}; one of {', '.join(builders)}")
    return builders[arch]


def _clip_template(arch: str) -> dict[str, Tensor]:
    from ovseg.encoders.clip import clip_state_template

    return clip_state_template(arch)


def _split_clip(clip: dict[str, Tensor], dropped: dict[str, str], prefix: str = ""
                ) -> Tensor | None:
    """Take the mask prompts and OpenAI's metadata scalars out of a CLIP state dict (in place);
    returns the prompts (None when the CLIP has none)."""
    from ovseg.encoders.clip import OPENAI_METADATA_KEYS
    from ovseg.modeling.mask_prompt_tuning import AUTHORS_PROMPTS_KEY

    for key in OPENAI_METADATA_KEYS:
        if key in clip:
            clip.pop(key)
            dropped[prefix + key] = "OpenAI's metadata scalar, not a weight"
    return clip.pop(AUTHORS_PROMPTS_KEY, None)


def _check_clip(checker: _Checker, clip_arch: str, clip: dict[str, Tensor],
                prompts: Tensor | None, prefix: str) -> dict[str, Tensor]:
    """Check the CLIP tensors (OpenAI names) and the prompts against ``clip_arch``; returns
    the CLIP template."""
    from ovseg.modeling.mask_prompt_tuning import AUTHORS_PROMPTS_KEY, MPT_DEPTH

    template = _clip_template(clip_arch)
    checker.check(f"the CLIP ({clip_arch})", template, clip,
                  {key: prefix + key for key in clip}, lambda key: prefix + key)
    if prompts is not None:
        positions, width = template["visual.positional_embedding"].shape
        layers = len({k.split(".")[3] for k in template
                      if k.startswith("visual.transformer.resblocks.")})
        depth = int(prompts.shape[0]) if prompts.dim() == 3 else MPT_DEPTH
        depth = depth if 1 <= depth <= layers + 1 else MPT_DEPTH
        expected = {PROMPTS_KEY: torch.empty(depth, positions - 1, width, device="meta")}
        checker.check("the mask prompts (depth x patches x width)", expected,
                      {PROMPTS_KEY: prompts}, {PROMPTS_KEY: prefix + AUTHORS_PROMPTS_KEY})
    return template


def _clip_settings(clip_arch: str) -> dict[str, Any]:
    # OpenAI's CLIPs use QuickGELU; a local file does not say so (open_clip's tags do)
    return {"model.clip.arch": clip_arch, "model.clip.quick_gelu": True}


def _convert_ovseg(state: dict[str, Tensor], arch: str | None, source: str) -> Conversion:
    from ovseg.modeling.mask_proposal.checkpoint import (
        AUTHORS_CLIP_PREFIX,
        authors_key,
        split_authors_state_dict,
    )

    split = split_authors_state_dict(state, source=source)  # every key has a home, or an error
    dropped = {key: "a constant of the authors' training or preprocessing, not a weight"
               for key in split.constants}
    clip = dict(split.clip)
    prompts = _split_clip(clip, dropped, AUTHORS_CLIP_PREFIX)
    proposals = _prefixed(split.proposal, "proposals.")

    def theirs(key: str) -> str:
        try:
            return authors_key(key[len("proposals."):])
        except KeyError:
            return key

    sources = {key: theirs(key) for key in proposals}
    queries = split.proposal.get("predictor.query_embed.weight")
    num_queries = int(queries.shape[0]) if queries is not None and queries.dim() == 2 else 100

    def attempt(backbone: str) -> Conversion:
        builder, clip_arch = _proposal_builder(backbone), OVSEG_CLIPS.get(backbone)
        checker = _Checker()
        template = _check_clip(checker, clip_arch, clip, prompts, AUTHORS_CLIP_PREFIX)
        embed_dim = int(template["text_projection"].shape[1])
        expected = _prefixed(_meta_state(lambda: builder(embed_dim=embed_dim,
                                                         num_queries=num_queries)), "proposals.")
        checker.check(f"the {backbone} proposal network", expected, proposals, sources, theirs)
        checker.done(backbone)
        main = dict(proposals)
        main_sources = dict(sources)
        settings = {"model.name": "mask_adapted", **_clip_settings(clip_arch),
                    "model.mask_adapted.proposal_backbone": backbone,
                    "model.mask_adapted.num_queries": num_queries}
        if prompts is not None:
            main[PROMPTS_KEY] = prompts
            main_sources[PROMPTS_KEY] = AUTHORS_CLIP_PREFIX + "visual.mask_embedding"
            settings["model.mask_adapted.mask_prompt_depth"] = int(prompts.shape[0])
        parts = [Part("", TRAINED_WEIGHTS_KEY, main, main_sources),
                 Part(".clip", "model.clip.weights", clip,
                      {key: AUTHORS_CLIP_PREFIX + key for key in clip})]
        notes = [] if prompts is not None else [
            "the file has no mask prompts: they stay zeros (set model.mask_adapted."
            "mask_prompt_fwd false to skip them)"]
        return Conversion("ovseg", backbone, parts, dropped, settings, notes)

    return _fit("ovseg", FORMATS["ovseg"].all_archs, arch, source, _OVSEG_FILES, attempt)


def _convert_ovseg_clip(state: dict[str, Tensor], arch: str | None, source: str) -> Conversion:
    from ovseg.modeling.mask_proposal.checkpoint import AUTHORS_CLIP_PREFIX

    clip = _strip_common_prefix(state, ("module.", AUTHORS_CLIP_PREFIX))
    dropped: dict[str, str] = {}
    prompts = _split_clip(clip, dropped)

    def attempt(clip_arch: str) -> Conversion:
        checker = _Checker()
        _check_clip(checker, clip_arch, clip, prompts, "")
        checker.done(clip_arch)
        parts = [Part("", "model.clip.weights", clip, {key: key for key in clip})]
        settings = _clip_settings(clip_arch)
        if prompts is not None:
            parts.append(Part(".prompts", TRAINED_WEIGHTS_KEY, {PROMPTS_KEY: prompts},
                              {PROMPTS_KEY: "visual.mask_embedding"}))
            settings = {"model.name": "mask_adapted", **settings,
                        "model.mask_adapted.mask_prompt_depth": int(prompts.shape[0])}
        return Conversion("ovseg_clip", clip_arch, parts, dropped, settings)

    return _fit("ovseg_clip", FORMATS["ovseg_clip"].all_archs, arch, source, _OVSEG_CLIP_FILES,
                attempt)


# ---- CLIP2Scene ----------------------------------------------------------------------------

_CLIP2SCENE_FILES = ("CLIP2Scene's MinkowskiEngine MinkUNet checkpoint (MinkUNet14A; keys "
                     "conv0p1s1.kernel, bn0.bn.weight, ..., final.kernel, local_feature.kernel)")


def _convert_clip2scene(state: dict[str, Tensor], arch: str | None, source: str) -> Conversion:
    from ovseg.modeling.minkunet import (
        AUTHOR_KEYS_DROPPED,
        MINKUNET_PLANS,
        MinkUNet,
        author_key_to_ours,
        our_key_to_author,
        plan_from_state,
        strip_author_prefixes,
    )

    state = strip_author_prefixes(state)
    dropped = {key: "the authors' fine-tuning classifier / source-free text embeddings, unused "
               "(ovseg's text classifier gives the classes)" for key in AUTHOR_KEYS_DROPPED
               if key in state}
    kept = {key: value for key, value in state.items() if key not in dropped}
    tensors, sources, unmatched = _map_keys(kept, lambda key: "student." + author_key_to_ours(key))
    ours = {key[len("student."):]: value for key, value in tensors.items()}

    def attempt(name: str) -> Conversion:
        if name not in MINKUNET_PLANS:
            raise WeightsError(f"unknown MinkUNet {name!r}; one of {', '.join(MINKUNET_PLANS)}")
        plan = plan_from_state(ours, name)
        with torch.device("meta"):
            network = MinkUNet(plan)
        expected = _prefixed(network.state_dict(), "student.")
        checker = _Checker()
        checker.check(f"MinkUNet planes={plan.planes} layers={plan.layers}", expected, tensors,
                      sources, lambda key: our_key_to_author(key[len("student."):], network),
                      unmatched)
        checker.done(name)
        default = MINKUNET_PLANS[name]
        settings: dict[str, Any] = {"model.name": "clip2scene", "model.clip2scene.student": name}
        if plan.planes != default.planes:
            settings["model.clip2scene.student_planes"] = list(plan.planes)
        if plan.init_dim != default.init_dim:
            settings["model.clip2scene.student_init_dim"] = plan.init_dim
        notes = [f"the heads are {plan.head_dim}-d: the CLIP's embedding must be too "
                 "(512: ViT-B/16)"]
        return Conversion("clip2scene", name, [Part("", "model.weights", tensors, sources)],
                          dropped, settings, notes)

    return _fit("clip2scene", FORMATS["clip2scene"].all_archs, arch, source, _CLIP2SCENE_FILES,
                attempt)


# ---- DINO ----------------------------------------------------------------------------------

_DINO_FILES = ("DINO's backbone file (dino_deitsmall8_pretrain.pth, dino_vitbase8_pretrain.pth, "
               "dino_vitbase16_pretrain.pth; keys cls_token, pos_embed, patch_embed.proj.*, "
               "blocks.N.*, norm.*)")
_DINO_PREFIXES = ("module.", "backbone.")


def _convert_dino(state: dict[str, Tensor], arch: str | None, source: str) -> Conversion:
    import timm

    from ovseg.encoders.dino import TINY_ARCHS, adapt_checkpoint, dino_vit_template

    def file_key(key: str) -> str | None:
        """The file's key of a timm key (DINOv2's renamed ones included)."""
        original = (key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
                    if ".mlp.fc" in key else "register_tokens" if key == "reg_token" else key)
        for name in dict.fromkeys((key, original)):
            for candidate in (name, *(prefix + name for prefix in _DINO_PREFIXES)):
                if candidate in state:
                    return candidate
        return None

    def attempt(name: str) -> Conversion:
        if name not in TINY_ARCHS and not timm.is_model(name):
            raise WeightsError(f"unknown DINO arch {name!r}: a timm model name such as "
                               "vit_small_patch8_224.dino")
        model = dino_vit_template(name)
        adapted = adapt_checkpoint(dict(state), model)
        sources = {key: file_key(key) or "(derived)" for key in adapted}
        used = set(sources.values())
        dropped = {key: "not part of the backbone (a training head or mask token)"
                   for key in state if key not in used}
        checker = _Checker()
        checker.check("", model.state_dict(), adapted, sources,
                      lambda key: file_key(key) or key)
        checker.done(name)
        return Conversion("dino", name, [Part("", "model.dino.weights", adapted, sources)],
                          dropped, {"model.dino.arch": name},
                          ["as FOUND's teacher (ViT-S/8) the same file is "
                           "model.clip_dinoiser.found_dino_weights, with found_dino_arch"])

    return _fit("dino", FORMATS["dino"].all_archs, arch, source, _DINO_FILES, attempt)


# ---- SAM -----------------------------------------------------------------------------------

_SAM_FILES = ("SAM's checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, "
              "sam_vit_h_4b8939.pth; keys image_encoder.*, prompt_encoder.*, mask_decoder.*)")


def _convert_sam(state: dict[str, Tensor], arch: str | None, source: str) -> Conversion:
    from ovseg.encoders.sam import SAM_SIZES, make_sam

    state = _strip_common_prefix(state, ("module.",))

    def attempt(name: str) -> Conversion:
        if name not in SAM_SIZES:
            raise WeightsError(f"unknown SAM arch {name!r}; one of {', '.join(SAM_SIZES)}")
        checker = _Checker()
        checker.check("", _meta_state(lambda: make_sam(SAM_SIZES[name])), state,
                      {key: key for key in state})
        checker.done(name)
        return Conversion("sam", name, [Part("", "model.sam.weights", dict(state),
                                             {key: key for key in state})],
                          settings={"model.sam.arch": name})

    return _fit("sam", FORMATS["sam"].all_archs, arch, source, _SAM_FILES, attempt)


# --------------------------------------------------------------------------- the registry

FORMATS: dict[str, CheckpointFormat] = {
    fmt.name: fmt for fmt in (
        CheckpointFormat("clip_dinoiser", _DINOISER_FILES,
                         "model.clip_dinoiser.heads (clip_dinoiser)", (), (),
                         ("model_state_dict",), _convert_dinoiser_heads),
        CheckpointFormat("found", _FOUND_FILES,
                         "model.clip_dinoiser.found_weights (clip_dinoiser training)", (), (),
                         ("decoder",), _convert_found),
        CheckpointFormat("ovseg", _OVSEG_FILES,
                         "model.mask_adapted.trained_weights + model.clip.weights "
                         "(mask_adapted)", ("r101c", "swin_b"), ("tiny",), ("model",),
                         _convert_ovseg),
        CheckpointFormat("ovseg_clip", _OVSEG_CLIP_FILES,
                         "model.clip.weights (+ model.mask_adapted.trained_weights for the "
                         "prompts)", ("ViT-B-16", "ViT-L-14"), ("ovseg-tiny-ViT-16",),
                         ("state_dict", "model"), _convert_ovseg_clip),
        CheckpointFormat("clip2scene", _CLIP2SCENE_FILES, "model.weights (clip2scene)",
                         ("MinkUNet14A", "MinkUNet18A"), (),
                         ("model_points", "state_dict", "model_state", "model"),
                         _convert_clip2scene),
        CheckpointFormat("dino", _DINO_FILES,
                         "model.dino.weights (trident, dense_clip proxy, clip_dinoiser)",
                         ("vit_small_patch8_224.dino", "vit_base_patch8_224.dino",
                          "vit_base_patch16_224.dino"), ("tiny-p8", "tiny-p16"),
                         ("state_dict", "model"), _convert_dino),
        CheckpointFormat("sam", _SAM_FILES, "model.sam.weights (trident)",
                         ("vit_b", "vit_l", "vit_h"), ("tiny",), (), _convert_sam),
    )
}


def get_format(name: str) -> CheckpointFormat:
    """The registered format ``name``.

    Raises:
        WeightsError: an unknown name (the known ones are listed).
    """
    if name not in FORMATS:
        raise WeightsError(f"unknown checkpoint format {name!r}; one of {', '.join(FORMATS)}")
    return FORMATS[name]


def part_path(destination: Path, suffix: str) -> Path:
    """Where a part goes: ``destination`` itself, or its stem + suffix + ``.safetensors``."""
    return destination if not suffix else destination.with_name(
        destination.stem + suffix + destination.suffix)


def convert_checkpoint(format_name: str, source: str | Path, destination: str | Path,
                       arch: str | None = None) -> Conversion:
    """Convert one released file to ovseg's files, strictly (see the module docstring).

    Args:
        format_name: a key of :data:`FORMATS`.
        source: the authors' file.
        destination: the ``.safetensors`` file to write; further parts and the ``.yaml``
            config snippet go beside it, named after its stem.
        arch: the architecture (``--arch``); None = the one the file fits.

    Returns:
        the :class:`Conversion`, with the written paths (``report()`` gives the table).

    Raises:
        WeightsError: one line: an unknown format or arch, an unreadable file, or a file that
            does not fit (the keys are listed).
    """
    fmt = get_format(format_name)
    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    if destination.suffix != ".safetensors":
        raise WeightsError(f"the converted file must end in .safetensors, got {destination}")
    if arch is not None and not fmt.all_archs:
        raise WeightsError(f"format {fmt.name} takes no --arch: the file sets its sizes")
    if arch is not None and arch not in fmt.all_archs and fmt.name != "dino":
        raise WeightsError(f"format {fmt.name} has no arch {arch!r}; one of "
                           f"{', '.join(fmt.all_archs)}")
    state = read_checkpoint(source, fmt.wrappers, fmt.files)
    conversion = fmt.convert(state, arch, str(source))
    conversion.source, conversion.source_sha256 = str(source), sha256_file(source)
    paths = {part_path(destination, part.suffix).resolve() for part in conversion.parts}
    if source.resolve() in paths:
        raise WeightsError(f"the output {destination} would overwrite the source file")
    for part in conversion.parts:
        part.path = part_path(destination, part.suffix).resolve()
        _write_part(part, conversion)
    conversion.snippet = destination.with_suffix(SNIPPET_SUFFIX).resolve()
    atomic_write_text(conversion.snippet, _snippet_text(conversion))
    return conversion


def _write_part(part: Part, conversion: Conversion) -> None:
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors that share memory (views of one storage)
    tensors = {key: value.detach().clone().contiguous() for key, value in part.tensors.items()}
    metadata = {"format": f"{FILE_FORMAT}.{conversion.format}", "arch": conversion.arch,
                "source": Path(conversion.source).name,
                "source_sha256": conversion.source_sha256}
    with atomic_path(part.path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def _snippet_text(conversion: Conversion) -> str:
    import yaml

    header = [f"# ovseg config for the weights converted from {conversion.source}",
              f"# (sha256 {conversion.source_sha256}) by tools/convert_checkpoint.py --format "
              f"{conversion.format}, arch {conversion.arch}.",
              "# Merge into a config of the method, or pass as trailing KEY VALUE overrides:",
              "#   " + " ".join(conversion.overrides)]
    header += [f"# note: {note}" for note in conversion.notes]
    body = yaml.safe_dump(conversion.config(), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body
