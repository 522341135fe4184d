"""Experiment 2: serving a model larger than device memory by streaming its weights."""
