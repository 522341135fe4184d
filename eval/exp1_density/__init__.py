"""Experiment 1: agent density under the static, lru and semantic schedulers."""
