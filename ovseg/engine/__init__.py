"""Training and evaluation machinery: process launching, the train loop, hooks, checkpoints.

Submodules are imported where they are used (``from ovseg.engine.trainer import ...``), so
importing ``ovseg.engine.comm`` stays cheap.
"""
