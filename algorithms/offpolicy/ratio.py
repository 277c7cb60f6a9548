"""Samples-per-insert bookkeeping for the off-policy loop (the rate Acme's SampleToInsertRatio limiter keeps)."""

from __future__ import annotations

import math


def updates_due(
    env_steps_inserted: int,
    batch_size: int,
    spi: float,
    updates_done: int,
    learning_starts: int = 0,
) -> int:
    """Number of learner updates to run now so that samples per insert ≈ ``spi`` after ``learning_starts``.

    With S = env steps inserted, U = updates done so far and B the batch size, the ratio is
    (U · B) / (S − learning_starts). The target count and the updates due are

        U*(S) = floor(max(0, S − learning_starts) · spi / B),    due = max(0, U*(S) − U)

    so after every call U ≤ U*(S): the ratio never overshoots and falls short by less than one batch,
    U·B / (S − learning_starts) > spi − B / (S − learning_starts). Example: spi = 32, B = 256 gives one
    update per 8 env steps; spi = B gives one update per env step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not spi > 0:
        raise ValueError(f"spi (samples per insert) must be > 0, got {spi}")
    if env_steps_inserted < 0 or updates_done < 0 or learning_starts < 0:
        raise ValueError(
            "env_steps_inserted, updates_done and learning_starts must be >= 0, got "
            f"{env_steps_inserted}, {updates_done}, {learning_starts}"
        )
    target = math.floor(max(0, env_steps_inserted - learning_starts) * spi / batch_size)
    return max(0, target - updates_done)
