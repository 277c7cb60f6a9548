"""Learning code: RLlib algorithms, networks, diagnostics, environments and non-RL tasks.

Nothing in this package talks to Ray Tune or MLflow; `orchestration` wraps it.
"""
