"""The project's fast off-policy core (issue 4): a tensor replay with n-step returns computed on insert,
the n-step targets as a pure function, and samples-per-insert bookkeeping."""

from algorithms.offpolicy.nstep import nstep_targets
from algorithms.offpolicy.ratio import updates_due
from algorithms.offpolicy.replay import FIELDS, TensorReplay

__all__ = ["FIELDS", "TensorReplay", "nstep_targets", "updates_due"]
