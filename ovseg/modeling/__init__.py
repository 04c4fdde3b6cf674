"""Trainable networks: the small networks methods train on top of frozen encoders.

One module per network, imported by its full name (this package imports none of them, so a
module runs as a command line, ``python -m ovseg.modeling.dinoiser_heads``, and one method's
networks never load another's), e.g.

- :mod:`ovseg.modeling.dinoiser_heads`: CLIP-DINOiser's correlation and background heads, their
  strict file loading and the converter of the authors' ``last.pt``;
- :mod:`ovseg.modeling.found`: FOUND's trained saliency decoder (CLIP-DINOiser's background
  teacher) and the strict loader of its released ``decoder_weights.pt``;
- :mod:`ovseg.modeling.files`: reading the authors' nested weight files strictly;
- :mod:`ovseg.modeling.mask_proposal`: mask-adapted CLIP's MaskFormer proposal network
  (R101c, Swin-B, tiny backbones; FPN; transformer decoder; CLIP-text class head) and the key
  map of the authors' checkpoints; :mod:`ovseg.modeling.matcher` and
  :mod:`ovseg.modeling.mask_criterion`: its Hungarian matching and losses;
  :mod:`ovseg.modeling.mask_prompt_tuning`: mask prompt tuning of CLIP's ViT;
- :mod:`ovseg.modeling.prompter`: CLOC's Prompter (box/point/text prompts -> region embeddings).
- :mod:`ovseg.modeling.minkunet`: CLIP2Scene's MinkUNet14A/18A student on sparse convolutions
  (``final`` and ``local`` 96 -> 512 heads) and the key map of the authors' checkpoint.
- :mod:`ovseg.modeling.convert`: the registry of released checkpoint formats (these key maps
  and the encoders' own files) -> ovseg's safetensors + config (``tools/convert_checkpoint.py``).
"""
