"""Mechanism and contracts: hookspecs, plugin manager, config, strategies, sessions, residency, memory.

Nothing in this package imports ``djinn.plugins``, ``djinn.engine`` or ``djinn.server``, nor torch at run time.
"""
