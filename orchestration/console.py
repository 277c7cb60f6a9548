"""What `orchestra run` / `orchestra resume` print while Tune runs.

The console shows our lines, one trial table at a time and real errors; library output goes to files:

- :class:`TrialTable` (a Tune ``CLIReporter``, passed as ``RunConfig(progress_reporter=...)``): per trial
  its status, the searched parameters, the spec's metric (last path segment as column name), steps (env
  steps for RLlib, the task's step counter otherwise; :func:`orchestration.tracking.result_step`), steps/s
  over the trial's training time and the iteration. Never the trial config. Printed when a trial ended or
  errored since the last table, at most every :data:`REFRESH_S` seconds, else every :data:`HEARTBEAT_S`
  while trials run, and once at the end. Tune's classic output engine is the one that honours a
  ``progress_reporter`` (the new one, on unless ``RAY_AIR_NEW_OUTPUT=0``, ignores it and prints the whole
  config of the best trial), so :func:`library_output` sets ``RAY_AIR_NEW_OUTPUT=0`` for the launch.
- :class:`ConsoleCallback` (a Tune callback in the driver): a tqdm progress line for a launch of one trial
  whose ``stop`` has a counter (training_iteration, steps, num_env_steps_sampled_lifetime, ...): done of
  the budget, rate, ETA; and one line per trial error or retry with the path of its ``error.txt``.
- :func:`library_output`: unless verbose, Ray's, RLlib's, MLflow's and Python's warnings and log
  records of the driver go to ``<launch folder>/orchestra_driver.log`` (errors still reach the console).
  Trial processes write stdout/stderr to ``stdout``/``stderr`` in their trial folder
  (``RunConfig(log_to_file=True)``; the runner turns ``log_to_driver`` off for local runs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback, CLIReporter

from orchestration.tracking import as_number, result_step

REFRESH_S = 30.0
"""At most one trial table (or non-terminal progress line) per this many seconds."""
HEARTBEAT_S = 120.0
"""A trial table at least this often while trials run, even when no trial ended."""
MAX_ROWS = 20
DRIVER_LOG = "orchestra_driver.log"
RL_METRIC = "env/episode_return_mean"
# Stop keys that count up to a budget, in the order a progress line prefers them; the label is its unit.
BUDGET_KEYS = {
    "training_iteration": "iter",
    "steps": "steps",
    "num_env_steps_sampled_lifetime": "env steps",
    "env_runners/num_env_steps_sampled_lifetime": "env steps",
    "timesteps_total": "steps",
    "time_total_s": "s",
}
# Console lines of Tune that repeat what our table and error lines say (they stay in the driver log).
_REPEATS = ("Trial task failed for trial", "Trials did not complete")


def echo(text: str) -> None:
    """Print a console line without breaking a live progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)


def short_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def result_value(result: Mapping[str, Any] | None, key: str) -> float | None:
    """A finite numeric value at ``key`` (``a/b`` for nested keys) of a Tune result, else None."""
    if not result:
        return None
    x = as_number(result.get(key))
    if x is None and "/" in key:
        node: Any = result
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        x = as_number(node)
    return x if x is not None and math.isfinite(x) else None


def steps_per_s(result: Mapping[str, Any] | None) -> float | None:
    """Steps (:func:`result_step`) per second of the trial's training time (``time_total_s``)."""
    steps = result_step(result) if result else None
    total = result_value(result, "time_total_s")
    return steps / total if steps is not None and total else None


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x)}"
    return f"{x:.4g}"


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def param_columns(trials: list[Any]) -> dict[str, str]:
    """Searched parameters (Tune's ``evaluated_params``) -> column names (last key segment if unique)."""
    keys: list[str] = []
    for t in trials:
        for k in getattr(t, "evaluated_params", None) or {}:
            if k not in keys:
                keys.append(k)
    shorts = [short_name(k) for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts)}


def error_summary(text: str | None) -> str:
    """The exception line of Tune's error text (its last non-empty line)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown error"


def trial_error_path(trial: Any) -> str:
    """Where the trial's error text is (or will be, once Tune syncs it): the trial folder's error.txt."""
    name = Path(trial.error_file).name if getattr(trial, "error_file", None) else "error.txt"
    return str(Path(trial.path, name)) if getattr(trial, "path", None) else str(trial.error_file)


class TrialTable(CLIReporter):
    """Tune's CLI reporter with our columns and refresh rule (see the module docstring)."""

    def __init__(self, metric: str | None, mode: str = "max", step_label: str = "steps",
                 console: ConsoleCallback | None = None, refresh_s: float = REFRESH_S,
                 heartbeat_s: float = HEARTBEAT_S, max_rows: int = MAX_ROWS):
        # metric/mode stay unset in the base class: Tune passes the TuneConfig's in setup() and refuses both.
        super().__init__(max_report_frequency=int(refresh_s), max_progress_rows=max_rows)
        self.column_metric, self.column_mode, self.step_label = metric, mode, step_label
        self.console, self.refresh_s, self.heartbeat_s = console, refresh_s, heartbeat_s
        self._last = time.monotonic()
        self._ended: set[str] = set()

    def setup(self, *args: Any, **kwargs: Any) -> None:
        super().setup(*args, **kwargs)
        self._last = time.monotonic()

    def should_report(self, trials: list[Any], done: bool = False) -> bool:
        if done:
            return True
        now = time.monotonic()
        if now - self._last < self.refresh_s or not any(t.last_result for t in trials):
            return False
        if self.console is not None and self.console.progress_active:
            return False  # one trial: its progress line says it
        ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if ended != self._ended or now - self._last >= self.heartbeat_s:
            self._last, self._ended = now, ended
            return True
        return False

    def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
        echo(self.table(trials, done, *sys_info))

    def _metric_value(self, trial: Any) -> float | None:
        return result_value(trial.last_result, self.column_metric) if self.column_metric else None

    def _rows_shown(self, trials: list[Any]) -> list[Any]:
        if len(trials) <= self._max_progress_rows:
            return list(trials)
        sign = -1.0 if self.column_mode == "max" else 1.0

        def rank(t: Any) -> tuple:
            v = self._metric_value(t)
            return ({"RUNNING": 0, "ERROR": 1}.get(t.status, 2), sign * v if v is not None else math.inf)

        keep = set(map(id, sorted(trials, key=rank)[: self._max_progress_rows]))
        return [t for t in trials if id(t) in keep]

    def table(self, trials: list[Any], done: bool, *sys_info: str) -> str:
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        resources = next((s.split(":", 1)[1].strip() for s in sys_info if s.startswith("Logical resource")), "")
        head = f"== {'done after ' if done else ''}{duration(time.time() - self._start_time)} | {states}"
        lines = [head + (f" | {resources}" if resources and not done else "") + " =="]
        params = param_columns(trials)
        header = ["trial", "status", *params.values()]
        if self.column_metric:
            header.append(short_name(self.column_metric))
        header += [self.step_label, "steps/s", "iter"]
        rows = [header]
        shown = self._rows_shown(trials)
        for t in shown:
            r = t.last_result or {}
            row = [str(t), t.status, *(fmt(t.evaluated_params.get(k)) for k in params)]
            if self.column_metric:
                row.append(fmt(self._metric_value(t)))
            rate = steps_per_s(r)
            row += [fmt(result_step(r) if r else None), "-" if rate is None else f"{rate:.0f}",
                    fmt(r.get("training_iteration"))]
            rows.append(row)
        lines += align(rows)
        if len(shown) < len(trials):
            lines.append(f"... {len(trials) - len(shown)} more trials")
        for t in trials:
            if t.status == "ERROR":
                lines.append(f"error: {t}: {trial_error_path(t)}")
        return "\n".join(lines)


def budget(stop: Mapping[str, Any] | None) -> tuple[str, float, str] | None:
    """(stop key, its value, unit) of the first counter among ``stop``'s keys (:data:`BUDGET_KEYS`)."""
    for key, unit in BUDGET_KEYS.items():
        x = as_number((stop or {}).get(key))
        if x is not None and x > 0:
            return key, x, unit
    return None


def _width(live: bool) -> dict[str, Any]:
    """tqdm's size: the terminal's as it changes, or a fixed one where the terminal reports none (a pty
    with 0 columns and 0 rows would make tqdm hide the bar)."""
    if not live:
        return {}  # a log line: never cut
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        if size.columns > 0 and size.lines > 0:
            return {"dynamic_ncols": True}
    except OSError:
        pass
    import shutil

    fallback = shutil.get_terminal_size()
    return {"ncols": fallback.columns, "nrows": fallback.lines}


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


class _Discard:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class ConsoleCallback(Callback):
    """Progress line for a launch of one trial, and a line for each trial error or retry."""

    def __init__(self, stop: Mapping[str, Any] | None, metric: str | None, step_label: str = "steps",
                 refresh_s: float = REFRESH_S):
        self.budget = budget(stop)
        self.metric, self.step_label, self.refresh_s = metric, step_label, refresh_s
        self.single = False
        self._bar: Any = None
        self._live = False
        self._printed = 0.0

    def __getstate__(self) -> dict:  # pickled with the Tuner's run config: never a live bar
        return {**self.__dict__, "_bar": None}

    @property
    def progress_active(self) -> bool:
        return self._bar is not None

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        self.single = total_num_samples == 1 and self.budget is not None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not self.single or len(trials) != 1:
            return
        key, total, unit = self.budget  # type: ignore[misc]
        done = result_value(result, key)
        if done is None:
            return
        parts = []
        if self.metric and result_value(result, self.metric) is not None:
            parts.append(f"{short_name(self.metric)}={fmt(result_value(result, self.metric))}")
        steps, rate = result_step(result), steps_per_s(result)
        if key not in ("steps", "num_env_steps_sampled_lifetime") and steps is not None:
            parts.append(f"{fmt(steps)} {self.step_label}")
        if rate is not None:
            parts.append(f"{rate:.0f} steps/s")
        if self._bar is None:
            from tqdm import tqdm

            self._live = sys.stderr.isatty()
            self._bar = tqdm(total=_whole(total), initial=_whole(done), desc=str(trial), unit=unit, leave=self._live,
                             file=sys.stderr if self._live else _Discard(), **_width(self._live),
                             mininterval=1.0, postfix=", ".join(parts),
                             bar_format="{desc} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
                             "{unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
            self._printed = time.monotonic()
        else:
            self._bar.set_postfix_str(", ".join(parts), refresh=False)
            self._bar.update(_whole(done) - self._bar.n)  # redraws at most once per mininterval
        if not self._live and time.monotonic() - self._printed >= self.refresh_s:
            self._printed = time.monotonic()
            echo(str(self._bar))

    def _close(self) -> None:
        if self._bar is None:
            return
        bar, self._bar = self._bar, None
        if not self._live:
            echo(str(bar))
        bar.close()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close()
        echo(f"trial {trial} ERROR: {error_summary(_read(trial.error_file))}\n  error log: {trial_error_path(trial)}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        echo(f"trial {trial} failed, retrying from its last checkpoint: {error_summary(_read(trial.error_file))}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._close()


def _read(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


# Driver loggers whose console output goes to the driver log (those without propagation to a parent here).
_LIBRARY_LOGGERS = ("ray", "ray.rllib", "mlflow", "alembic", "py.warnings")


class _DropRepeats(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_REPEATS)


@contextlib.contextmanager
def library_output(folder: Path, *, verbose: bool, rllib: bool = False) -> Iterator[Path | None]:
    """Tune's classic output engine for the block; unless ``verbose``, the driver's library log records below
    ERROR and Python warnings go to ``folder/orchestra_driver.log`` (yielded; None when verbose)."""
    saved_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    undo: list[Any] = []
    try:
        if verbose:
            yield None
            return
        import ray  # noqa: F401 - create the library loggers and their handlers first
        import ray.tune  # noqa: F401

        with contextlib.suppress(ImportError):
            import mlflow  # noqa: F401
        if rllib:
            import ray.rllib  # noqa: F401
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / DRIVER_LOG
        file_handler = logging.FileHandler(log, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        undo.append(file_handler.close)
        drop = _DropRepeats()
        for name in _LIBRARY_LOGGERS:
            lg = logging.getLogger(name)
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    undo.append(lambda h=h, level=h.level: (h.setLevel(level), h.removeFilter(drop)))
                    h.setLevel(max(h.level, logging.ERROR))
                    h.addFilter(drop)
            if name == "py.warnings":
                undo.append(lambda lg=lg, p=lg.propagate: setattr(lg, "propagate", p))
                lg.propagate = False
            lg.addHandler(file_handler)
            undo.append(lambda lg=lg: lg.removeHandler(file_handler))
        logging.captureWarnings(True)
        undo.append(lambda: logging.captureWarnings(False))
        yield log
    finally:
        for fn in reversed(undo):
            fn()
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env
