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

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from algorithms.diagnostics.rllib_bsuite import BsuiteEpisodeRecorder, log_bsuite_episodes
from algorithms.eve.exploration import (
    PosteriorExplorer,
    epsilon_greedy_actions,
    greedy_actions,
    linear_epsilon,
)
from algorithms.offpolicy.env_runner import Rollout, VectorEnvRunner, episode_seed
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
        if not explore:
            return super().compute_actions(obs, explore)
        if self._burn_in():
            return self._random_actions()
        x = torch.from_numpy(obs).float()
        if self.config.exploration == "posterior":
            return self.explorer.act(x).numpy()
        with torch.no_grad():
            q = self.module.q_values(x)
        return self._actions_from_q(q)

    def _burn_in(self) -> bool:
        """Before ``learning_starts`` global env steps (this runner's count × sampling runners)."""
        runners = max(1, int(self.num_workers or 0))
        return self.num_env_steps_sampled_lifetime * runners < int(self.config.learning_starts)

    def _random_actions(self) -> np.ndarray:
        return torch.randint(int(self.action_space.n), (self.num_envs,), generator=self.generator).numpy()

    def _actions_from_q(self, q: torch.Tensor) -> np.ndarray:
        """Exploring actions [E] from Q_θ̂ [E, A] (ε-greedy or greedy; not posterior)."""
        cfg = self.config
        if cfg.exploration == "epsilon_greedy":
            eps = linear_epsilon(self.num_env_steps_sampled_lifetime, float(cfg.epsilon_initial),
                                 float(cfg.epsilon_final), int(cfg.epsilon_timesteps))
            return epsilon_greedy_actions(q, eps, self.generator).numpy()
        return q.argmax(dim=1).numpy()

    # -- seed packs: one Q pass for all replicas ---------------------------------------------------
    def supports_packed_actions(self) -> bool:
        """ε-greedy and greedy act on Q_θ̂ alone, so a pack's replicas can share one vmapped Q pass; posterior
        exploration acts on each env's own θ̃_e (:class:`PosteriorExplorer`) and samples runner by runner."""
        return self.config.exploration in ("epsilon_greedy", "greedy")

    def action_network(self) -> torch.nn.Module:
        return self.module.q

    @classmethod
    def packed_actions(cls, runners: list[VectorEnvRunner], explore: bool,
                       forward: Callable[[list[int], torch.Tensor], torch.Tensor]) -> list[np.ndarray]:
        """Per runner what ``compute_actions`` returns: the runners past burn-in (all of them when not
        exploring) get Q_θ̂ [E, A] from one ``forward`` call on their stacked observations (float), then
        their own ε-greedy draws from their own generators, in runner order; runners in burn-in draw their
        uniform actions from their generators and skip the pass. Not exploring: argmax_a Q_θ̂(s, a)
        (EVEModule.act)."""
        need = [k for k, r in enumerate(runners) if not explore or not r._burn_in()]
        q = None
        if need:
            x = torch.stack([torch.from_numpy(runners[k]._obs) for k in need]).float()
            with torch.no_grad():
                q = forward(need, x)
        out, row = [], 0
        for k, r in enumerate(runners):
            if row < len(need) and need[row] == k:
                qk = q[row]
                row += 1
                out.append(r._actions_from_q(qk) if explore else greedy_actions(qk).cpu().numpy())
            else:
                out.append(r._random_actions())
        return out

    def end_sample(self, rollout: Rollout) -> dict[str, np.ndarray]:
        out = super().end_sample(rollout)
        if self.record_bsuite_episodes:
            for env in self.envs:
                log_bsuite_episodes(self.metrics, env.drain())
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"explorer": self.explorer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if "explorer" in state:
            self.explorer.load_state_dict(state["explorer"])
