"""The import path of EVE before it moved into algorithms/eve/config.py, kept for old checkpoints only.

An RLlib checkpoint pickles its Algorithm class by import path (``class_and_ctor_args.pkl``, read by
``Algorithm.from_checkpoint``, e.g. ``orchestra eval``); checkpoints written before the move name
``algorithms.eve.algorithm.EVE``. Code imports ``algorithms.eve.config``.
"""

from algorithms.eve.config import EVE

__all__ = ["EVE"]
