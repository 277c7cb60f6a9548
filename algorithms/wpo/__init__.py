"""Wasserstein Policy Optimization (Pfau et al., ICML 2025; docs/methods.md#wpo) on the off-policy core:
config, module, learner, algorithm and the pure losses.
"""
