"""Differentiable inner loops and meta-gradient engines (reverse, reverse_remat, MixFlow-MG)."""

from algorithms.meta.engines import (
    ENGINES,
    MeanOuterLoss,
    MetaGradient,
    WeightedInnerLoss,
    meta_gradient,
    mixflow_inner_grad,
    unroll,
)
from algorithms.meta.functional import functional, load_params_, param_tuple
from algorithms.meta.optimizers import SGD, Adam, InnerOptimizer, make_inner_optimizer

__all__ = [
    "ENGINES", "SGD", "Adam", "InnerOptimizer", "MeanOuterLoss", "MetaGradient", "WeightedInnerLoss", "functional", "load_params_",
    "make_inner_optimizer", "meta_gradient", "mixflow_inner_grad", "param_tuple", "unroll",
]
