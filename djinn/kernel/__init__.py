"""Mechanism and contracts: hookspecs, plugin manager, config, the scheduler, tier and placement
contracts, sessions, residency, admission, memory.

Nothing in this package imports ``djinn.plugins``, ``djinn.wire``, ``djinn.engine`` or ``djinn.server``,
nor torch at run time.
"""
