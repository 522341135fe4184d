"""Mechanism and contracts: hookspecs, plugin manager, the configuration it reads, the scheduler,
tier and placement contracts, sessions, residency, admission, memory.

Nothing in this package imports ``djinn.plugins``, ``djinn.wire``, ``djinn.engine``, ``djinn.server``
or ``djinn.config``, nor torch at run time.
"""
