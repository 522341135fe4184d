"""Reliability and security runs: fuzzing, disconnect storms, exhaustion, soak."""
