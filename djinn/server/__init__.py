"""How requests arrive: the wire format, the connection loop, breakpoint pauses, HTTP, launching."""
