"""Benchmarks and experiments; each writes JSON under eval/results/."""
