"""Trainable networks: the small networks methods train on top of frozen encoders.

One module per network, imported by its full name (this package imports none of them, so a
module runs as a command line, ``python -m ovseg.modeling.dinoiser_heads``, and one method's
networks never load another's), e.g.

- :mod:`ovseg.modeling.dinoiser_heads`: CLIP-DINOiser's correlation and background heads, their
  strict file loading and the converter of the authors' ``last.pt``;
- :mod:`ovseg.modeling.found`: FOUND's trained saliency decoder (CLIP-DINOiser's background
  teacher) and the strict loader of its released ``decoder_weights.pt``;
- :mod:`ovseg.modeling.files`: reading the authors' nested weight files strictly.
"""
