"""EVE: epistemic Q-learning (Schmitt, Shawe-Taylor, van Hasselt, AAAI 2023) as an RLlib Algorithm on the
off-policy core (algorithms/offpolicy).

One iteration is the core's ``training_step`` (sample with :class:`~algorithms.eve.env_runner.EVEEnvRunner`,
insert, update at ``samples_per_insert``, sync weights, with the Fisher buffers, to the runners) plus
the learner's uncertainty report as ``uncertainty/...`` result keys:
``uncertainty/q_epistemic_std`` (mean over replay states of the Delta-Variance std of Q at the greedy
action; also ``_max``, ``_min``), ``uncertainty/posterior_std_{mean,min,max}``,
``uncertainty/fisher_mean`` and ``uncertainty/num_data`` (N). Only with exploration="posterior".
"""

from __future__ import annotations

from algorithms.eve.config import EVEConfig
from algorithms.offpolicy.algorithm import OffPolicyAlgorithm

UNCERTAINTY = "uncertainty"


class EVE(OffPolicyAlgorithm):
    """Epistemic Q-learning (exploration="posterior") or its ε-greedy baseline; see algorithms.eve.config."""

    @classmethod
    def get_default_config(cls) -> EVEConfig:
        return EVEConfig(cls)

    def training_step(self) -> None:
        super().training_step()
        stats = [r.get() for r in self.learner_group.foreach_learner(lambda learner: learner.uncertainty_stats())]
        for name, value in (stats[0] if stats else {}).items():
            self.metrics.log_value((UNCERTAINTY, name), value, window=1)
