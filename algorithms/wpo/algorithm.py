"""The import path of WPO before it moved into algorithms/wpo/config.py, kept for old checkpoints only.

An RLlib checkpoint pickles its Algorithm class by import path (``class_and_ctor_args.pkl``, read by
``Algorithm.from_checkpoint``, e.g. ``orchestra eval`` and benchmarks/dmc_100k.py's resume); checkpoints
written before the move name ``algorithms.wpo.algorithm.WPO``. Code imports ``algorithms.wpo.config``.
"""

from algorithms.wpo.config import WPO

__all__ = ["WPO"]
