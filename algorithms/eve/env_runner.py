"""EVEEnvRunner: the off-policy core's VectorEnvRunner with EVE's posterior sampling or ε-greedy.

Exploration per env (``config.explore`` True):
- env steps before ``learning_starts`` (this runner's count × number of sampling runners, i.e. the
  global burn-in): uniformly random actions from the runner's generator;
- ``exploration="posterior"``: greedy on the env's own posterior sample θ̃_e
  (:class:`algorithms.eve.exploration.PosteriorExplorer`), drawn when its episode starts (or every k
  steps) from θ̂, ``fisher_diag`` and ``num_data`` of the latest weights, from a generator seeded by
  (seed, runner index), saved in the runner's checkpointed sampler state;
- ``exploration="epsilon_greedy"``: ε-greedy on θ̂ with ε annealed linearly over this runner's env steps;
- ``exploration="greedy"``: greedy on θ̂ (also what ``explore=False`` does).

bsuite scoring: when ``record_bsuite_episodes`` is set (the ``bsuite`` diagnostic sets it), each
finished bsuite episode's ``info["bsuite"]`` is logged as an item under
:data:`algorithms.diagnostics.rllib_bsuite.BSUITE_EPISODES_KEY` for the diagnostic to score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from algorithms.diagnostics.rllib_bsuite import BsuiteEpisodeRecorder, log_bsuite_episodes
from algorithms.eve.exploration import PosteriorExplorer, epsilon_greedy_actions, linear_epsilon
from algorithms.offpolicy.env_runner import VectorEnvRunner, episode_seed
from algorithms.uncertainty import module_params

_EXPLORER_STREAM = 2_000_003


class EVEEnvRunner(VectorEnvRunner):
    """Posterior-sampling (or ε-greedy) exploration and bsuite episode recording; see the module docstring."""

    record_bsuite_episodes: bool = False

    def make_module(self) -> None:
        super().make_module()
        cfg = self.config
        self.explorer = PosteriorExplorer(
            self.module.q, self.num_envs,
            seed=episode_seed(self.base_seed, self.worker_index, _EXPLORER_STREAM, 0),
            resample=cfg.resample, every=int(cfg.resample_every), scale=float(cfg.posterior_scale),
            perturbation=cfg.perturbation)
        self.on_weights_set()

    def make_env(self) -> None:
        super().make_env()
        self.envs = [BsuiteEpisodeRecorder(e) for e in self.envs]

    def on_weights_set(self) -> None:
        if getattr(self, "explorer", None) is None:
            return
        if self.config.exploration != "posterior" and self.explorer.like is not None:
            # Only posterior exploration acts on the explorer's posterior; its checkpointed state (generator,
            # the zero perturbations, pending draws) is set up by the first call and does not depend on θ̂.
            return
        m = self.module
        self.explorer.set_posterior(module_params(m.q), m.fisher_diag, float(m.num_data),
                                    float(self.config.prior_precision))

    def on_episode_start(self, env_indices: np.ndarray) -> None:
        mask = torch.zeros(self.num_envs, dtype=torch.bool)
        mask[torch.as_tensor(env_indices, dtype=torch.long)] = True
        self.explorer.episode_started(mask)

    def compute_actions(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        cfg = self.config
        x = torch.from_numpy(obs).float()
        if not explore:
            return super().compute_actions(obs, explore)
        runners = max(1, int(self.num_workers or 0))
        if self.num_env_steps_sampled_lifetime * runners < int(cfg.learning_starts):
            return torch.randint(int(self.action_space.n), (self.num_envs,), generator=self.generator).numpy()
        if cfg.exploration == "posterior":
            return self.explorer.act(x).numpy()
        with torch.no_grad():
            q = self.module.q_values(x)
        if cfg.exploration == "epsilon_greedy":
            eps = linear_epsilon(self.num_env_steps_sampled_lifetime, float(cfg.epsilon_initial),
                                 float(cfg.epsilon_final), int(cfg.epsilon_timesteps))
            return epsilon_greedy_actions(q, eps, self.generator).numpy()
        return q.argmax(dim=1).numpy()

    def sample(self, **kwargs: Any) -> dict[str, np.ndarray]:
        out = super().sample(**kwargs)
        if self.record_bsuite_episodes:
            for env in self.envs:
                log_bsuite_episodes(self.metrics, env.drain())
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"explorer": self.explorer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if "explorer" in state:
            self.explorer.load_state_dict(state["explorer"])
