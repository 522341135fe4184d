"""How bytes move: the transport and serializer contracts (``contracts``) and the frame format
(``frames``), shared by the client, the server, the cluster router and the transport and
serializer plugins. Imports nothing of Djinn but ``djinn.kernel``, and no torch at import time.
"""
