"""Atari 2600 games of the Arcade Learning Environment (`ale/<Game>`, e.g. `ale/Pong`, `ale/SpaceInvaders`),
with the evaluation protocol of Machado et al. (2018, "Revisiting the Arcade Learning Environment", JAIR),
built from ale_py's `AtariEnv` and gymnasium's own wrappers.

Defaults (every one a keyword of :func:`make_ale_env`, so a spec's `env_config` overrides it):

- sticky actions: with probability `repeat_action_probability` = 0.25 the emulator repeats the previous
  action on a frame instead of the agent's (ALE's own setting, `ale.getFloat("repeat_action_probability")`);
- the full action set (`full_action_space=True`): `Discrete(18)`, the same joystick inputs in the same
  order for every game, so games share one action space (what `sequence/ale` needs). Exceptions: ALE's
  legal set of skiing and lost_luggage has no fire button, `Discrete(9)` (no-op and the 8 directions);
- frame skip 4 with max-pooling over the last two frames of each skip (flicker), 84 x 84 greyscale:
  `gymnasium.wrappers.AtariPreprocessing(frame_skip=4)` on an `AtariEnv(frameskip=1)`, so one agent step is
  4 emulator frames (`ale.getEpisodeFrameNumber()` grows by 4);
- 4 stacked frames: `gymnasium.wrappers.FrameStackObservation(4)`;
- episodes capped at 108,000 frames (27,000 agent steps; ALE's `max_num_frames_per_episode`), reported as
  `truncated=True`; no no-op starts (`noop_max=0`: sticky actions are the protocol's stochasticity);
- no life-loss signal: an episode ends only at game over. `terminal_on_life_loss=True` ends it at every
  life lost (gymnasium's AtariPreprocessing semantics: the next `reset` starts a new game);
- rewards are the game's own score changes (not clipped), so episode returns are game scores.

Observation: `Box(0, 255, (4, 84, 84), uint8)`, layout [C, H, W] = [frames, height, width], oldest frame
first. This is the layout of the Nature-DQN encoder (`network: {encoder: nature_cnn}`,
algorithms/networks/builders.py::NatureCNN), which scales the intensities by 1/255 itself; the observation
stays uint8 so replay buffers hold a quarter of the float32 bytes.

Info: ALE's `lives`, `episode_frame_number`, `frame_number`. Seeding: `reset(seed=s)` seeds the emulator,
its sticky-action draws and (with `noop_max > 0`) the no-op count. The ROMs ship in the ale-py wheel;
nothing is downloaded at run time.
"""

from __future__ import annotations

import gymnasium

from algorithms.envs.registration import ALE_GAMES


def make_ale_env(
    game: str,
    *,
    repeat_action_probability: float = 0.25,
    full_action_space: bool = True,
    frame_skip: int = 4,
    screen_size: int = 84,
    frame_stack: int = 4,
    max_num_frames_per_episode: int = 108_000,
    terminal_on_life_loss: bool = False,
    noop_max: int = 0,
    mode: int | None = None,
    difficulty: int | None = None,
) -> gymnasium.Env:
    """One ALE game (an ale_py ROM id such as `pong`) with the protocol of the module docstring."""
    if game not in ALE_GAMES:
        raise ValueError(f"game must be a single-player ale_py ROM id such as 'pong' (see "
                         f"algorithms.envs.registration.ALE_GAMES); got {game!r}")
    if not 0.0 <= repeat_action_probability <= 1.0:
        raise ValueError(f"repeat_action_probability must be in [0, 1]; got {repeat_action_probability!r}")
    for key, value in (("frame_skip", frame_skip), ("screen_size", screen_size), ("frame_stack", frame_stack),
                       ("max_num_frames_per_episode", max_num_frames_per_episode)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1; got {value!r}")
    from ale_py.env import AtariEnv
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    base = AtariEnv(
        game=game, mode=mode, difficulty=difficulty, obs_type="grayscale", frameskip=1,
        repeat_action_probability=repeat_action_probability, full_action_space=full_action_space,
        max_num_frames_per_episode=max_num_frames_per_episode,
    )
    env = AtariPreprocessing(base, noop_max=noop_max, frame_skip=frame_skip, screen_size=screen_size,
                             terminal_on_life_loss=terminal_on_life_loss, grayscale_obs=True, scale_obs=False)
    return FrameStackObservation(env, frame_stack)
