"""Wasserstein Policy Optimization (Pfau et al., ICML 2025; docs/methods.md#wpo) on the off-policy core:
config.py (WPOSettings, WPOConfig and the Algorithm WPO), module.py, learner.py and the pure losses.py;
algorithm.py only keeps old checkpoints' import path of WPO.
"""
