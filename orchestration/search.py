"""Search-space markers in specs -> Ray Tune domains; scheduler and search-algorithm builders.

Markers may appear anywhere inside a spec's ``config`` (and in PBT ``mutations``)::

    lr: {loguniform: [1.0e-5, 1.0e-3]}      # tune.loguniform(low, high)
    gamma: {uniform: [0.95, 0.999]}         # tune.uniform(low, high)
    num_epochs: {randint: [1, 10]}          # tune.randint(low, high): high is EXCLUSIVE, as in Tune
    activation: {choice: [relu, tanh]}      # tune.choice(values), sampled
    hidden: {grid: [[64, 64], [256, 256]]}  # tune.grid_search(values): every value, crossed with others

A marker is a mapping with exactly one key, that key being a marker name.
"""

from __future__ import annotations

import itertools
from typing import Any

MARKERS = ("grid", "choice", "uniform", "loguniform", "randint")


class MarkerError(ValueError):
    def __init__(self, path: str, message: str, value: Any):
        super().__init__(message)
        self.path = path
        self.message = message
        self.value = value


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in MARKERS


def check_marker(value: dict, path: str) -> None:
    """Raise MarkerError (naming ``path.<marker>``) if a marker's arguments are malformed."""
    (name, args), = value.items()
    where = f"{path}.{name}" if path else name
    if name in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise MarkerError(where, "expects a non-empty list of values", args)
        for i, a in enumerate(args):
            if is_marker(a):
                raise MarkerError(f"{where}[{i}]", "markers cannot be nested", a)
        return
    if (
        not isinstance(args, list)
        or len(args) != 2
        or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    ):
        raise MarkerError(where, "expects a list of two numbers [low, high]", args)
    low, high = args
    if not low < high:
        raise MarkerError(where, "expects low < high", args)
    if name == "loguniform" and low <= 0:
        raise MarkerError(where, "expects 0 < low < high", args)
    if name == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise MarkerError(where, "expects two integers [low, high) (high exclusive)", args)


def near_marker(value: Any) -> str | None:
    """The marker name a one-key mapping was probably meant to be (``{unifrm: [0, 1]}``), or None."""
    import difflib

    if isinstance(value, dict) and len(value) == 1 and not is_marker(value):
        key = str(next(iter(value)))
        close = difflib.get_close_matches(key, MARKERS, n=1, cutoff=0.75)
        return close[0] if close else None
    return None


def walk_markers(tree: Any, path: str = ""):
    """Yield (path, marker dict) for every marker inside ``tree``."""
    if is_marker(tree):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from walk_markers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from walk_markers(v, f"{path}[{i}]")


def _walk_near(tree: Any, path: str):
    guess = near_marker(tree)
    if guess:
        yield path, tree, guess
    elif isinstance(tree, dict) and not is_marker(tree):
        for k, v in tree.items():
            yield from _walk_near(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _walk_near(v, f"{path}[{i}]")


def validate_markers(tree: Any, path: str = "") -> None:
    for p, m in walk_markers(tree, path):
        check_marker(m, p)
    for p, value, guess in _walk_near(tree, path):
        key = next(iter(value))
        raise MarkerError(f"{p}.{key}" if p else str(key), f"unknown marker; did you mean {guess}? (markers are "
                          + ", ".join(MARKERS) + ")", value)


def to_tune(tree: Any) -> Any:
    """Replace every marker in ``tree`` by the Tune domain it stands for (recursively)."""
    from ray import tune

    if is_marker(tree):
        (name, args), = tree.items()
        if name == "grid":
            return tune.grid_search(list(args))
        if name == "choice":
            return tune.choice(list(args))
        return getattr(tune, name)(*args)
    if isinstance(tree, dict):
        return {k: to_tune(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_tune(v) for v in tree]
    return tree


def has_grid(tree: Any) -> bool:
    return any(next(iter(m)) == "grid" for _, m in walk_markers(tree))


def grid_variants(tree: Any) -> list[tuple[dict[str, Any], Any]]:
    """Expand only the grid markers: [(assignment {path: value}, tree with grids replaced)].

    Random markers are left in place. Used by ``--dry-run`` and by validation of each grid value.
    """
    found = [(p, m["grid"]) for p, m in walk_markers(tree) if "grid" in m]
    if not found:
        return [({}, tree)]
    out = []
    for combo in itertools.product(*(values for _, values in found)):
        assignment = {p: v for (p, _), v in zip(found, combo)}
        out.append((assignment, _substitute(tree, "", assignment)))
    return out


def _substitute(tree: Any, path: str, assignment: dict[str, Any]) -> Any:
    if path in assignment and is_marker(tree):
        return assignment[path]
    if isinstance(tree, dict) and not is_marker(tree):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), assignment) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_substitute(v, f"{path}[{i}]", assignment) for i, v in enumerate(tree)]
    return tree


def representative(tree: Any) -> Any:
    """``tree`` with every marker replaced by one admissible value (first option or low bound)."""
    if is_marker(tree):
        (name, args), = tree.items()
        return args[0]
    if isinstance(tree, dict):
        return {k: representative(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [representative(v) for v in tree]
    return tree


def marker_options(tree: Any) -> list[Any]:
    """Concrete values a marker subtree can validate against: each grid/choice value, or both bounds."""
    if is_marker(tree):
        (name, args), = tree.items()
        if name in ("grid", "choice"):
            return list(args)
        return [args[0], args[1] - 1 if name == "randint" else args[1]]
    return [tree]


def describe(tree: Any) -> str:
    if is_marker(tree):
        (name, args), = tree.items()
        return f"{name}{args}"
    return repr(tree)


def build_scheduler(spec: Any) -> Any:
    """Tune scheduler from ``spec.scheduler`` (None, asha, pbt)."""
    sched = spec.scheduler
    if sched is None or sched.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if sched.type == "asha":
        return ASHAScheduler(
            time_attr=sched.time_attr,
            max_t=sched.max_t,
            grace_period=sched.grace_period,
            reduction_factor=sched.reduction_factor,
        )
    mutations = {k: _pbt_mutation(v) for k, v in (sched.mutations or {}).items()}
    return PopulationBasedTraining(
        time_attr=sched.time_attr,
        perturbation_interval=sched.perturbation_interval,
        burn_in_period=sched.burn_in_period,
        hyperparam_mutations=mutations,
        quantile_fraction=sched.quantile_fraction,
        resample_probability=sched.resample_probability,
        synch=sched.synch,
    )


def _pbt_mutation(value: Any) -> Any:
    from ray import tune

    if is_marker(value):
        (name, args), = value.items()
        if name in ("grid", "choice"):
            return list(args)
        return getattr(tune, name)(*args)
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return {k: _pbt_mutation(v) for k, v in value.items()}
    raise ValueError(f"PBT mutation must be a marker or a list, got {value!r}")


def build_search_alg(spec: Any, repeat: int) -> Any:
    """Tune search algorithm from ``spec.search``; seeds repeat through Repeater where needed."""
    search = spec.search
    if search is None or search.type in ("basic", "grid", "random"):
        return None
    from ray.tune.search import ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    alg: Any = OptunaSearch(metric=spec.metric, mode=spec.mode, seed=search.seed)
    if repeat > 1:
        alg = Repeater(alg, repeat=repeat, set_index=True)
    if spec.max_concurrent_trials:
        alg = ConcurrencyLimiter(alg, max_concurrent=spec.max_concurrent_trials)
    return alg
