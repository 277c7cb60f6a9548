"""Wasserstein Policy Optimization (issue 4): config, module, learner, algorithm and the pure losses."""
