"""How requests arrive: the connection loop, breakpoint pauses, HTTP, launching. The frame
format they speak is ``djinn.wire``'s."""
