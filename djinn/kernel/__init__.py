"""The mechanism: hookspecs, plugin manager, config, sessions, memory accounting, runner, server.

Nothing in this package imports ``djinn.plugins``; plugins are found through entry points.
"""
