"""Non-RL workloads as plain Python objects; orchestration wraps them as Tune trainables."""
