"""Diagnostics: pure metric functions on tensors plus the adapters that report them in trials."""
