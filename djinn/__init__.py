"""Djinn: a tensor operating system for one GPU and many clients."""

__version__ = "0.1.0"
