"""MinAtar games as gymnasium environments (`minatar/<game>`: asterix, breakout, freeway, seaquest,
space_invaders), over MinAtar's own `minatar.Environment`.

- Observation: the game state, 10 x 10 x C channels-last (HWC, the layout RLlib's CNN encoders take),
  as float32 in {0, 1} (MinAtar gives bool). C = 4 asterix, 4 breakout, 7 freeway, 10 seaquest,
  6 space_invaders.
- Action: `Discrete(6)`, MinAtar's full action set (no-op, left, up, right, down, fire) shared by every
  game, the default of MinAtar's own gym registration; `minimal_action_set=True` gives each game's
  minimal set instead (index 0 is always no-op).
- MinAtar defaults: sticky actions with probability 0.1 (the previous action repeats) and difficulty
  ramping on. Episodes end only by the game's own termination, unless `max_episode_steps` is given
  (then `truncated=True` at that many steps).
- Seeding: `reset(seed=s)` reseeds MinAtar's RandomState, which drives both the game and the sticky
  actions; the sticky 'previous action' is reset to no-op at every reset (MinAtar keeps it across
  episodes), so a seeded episode does not depend on the one before.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from algorithms.envs.registration import MINATAR_GAMES


class MinAtarEnv(gymnasium.Env[np.ndarray, int]):
    """One MinAtar game; see the module docstring."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        game: str,
        sticky_action_prob: float = 0.1,
        difficulty_ramping: bool = True,
        minimal_action_set: bool = False,
        max_episode_steps: int | None = None,
    ):
        if game not in MINATAR_GAMES:
            raise ValueError(f"game must be one of {list(MINATAR_GAMES)}; got {game!r}")
        if not 0.0 <= sticky_action_prob <= 1.0:
            raise ValueError(f"sticky_action_prob must be in [0, 1]; got {sticky_action_prob!r}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None; got {max_episode_steps!r}")
        import minatar  # imports matplotlib and seaborn (for its display): about 2 s, once per process

        self.game = game
        self._game = minatar.Environment(
            game, sticky_action_prob=sticky_action_prob, difficulty_ramping=difficulty_ramping
        )
        self._action_set = (
            list(self._game.minimal_action_set()) if minimal_action_set else list(range(self._game.num_actions()))
        )
        self.max_episode_steps = max_episode_steps
        self._steps = 0
        self.action_space = gymnasium.spaces.Discrete(len(self._action_set))
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, self._game.state_shape(), np.float32)

    def _observation(self) -> np.ndarray:
        return self._game.state().astype(np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._game.seed(seed)
        self._game.last_action = 0
        self._game.reset()
        self._steps = 0
        return self._observation(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        reward, terminal = self._game.act(self._action_set[int(action)])
        self._steps += 1
        terminated = bool(terminal)
        truncated = not terminated and self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        return self._observation(), float(reward), terminated, truncated, {}
