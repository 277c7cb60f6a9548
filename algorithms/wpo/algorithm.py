"""WPO: Wasserstein Policy Optimization (Pfau et al., ICML 2025) as an RLlib Algorithm on the off-policy core."""

from __future__ import annotations

from algorithms.offpolicy.algorithm import OffPolicyAlgorithm
from algorithms.wpo.config import WPOConfig


class WPO(OffPolicyAlgorithm):
    """Samples with VectorEnvRunner, trains WPOLearner at ``samples_per_insert`` (see algorithms.offpolicy)."""

    @classmethod
    def get_default_config(cls) -> WPOConfig:
        return WPOConfig(cls)
