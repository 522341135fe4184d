"""Djinn past one GPU: a server per GPU as a Ray actor, and a router in front of them.

    from djinn.cluster import start_cluster
    cluster = start_cluster(config, servers=2)        # Ray actors, a placement group, the router
    client = djinn.client.connect(cluster.url)        # the native protocol, as to one server
    ...
    cluster.stop()

The router (``router.Router``) keeps each session on the server that holds its KV, places new
sessions where admission is cheapest (``placement``), and moves idle sessions off a server that
runs out of memory (``handoff`` exports and imports a session's KV and tokens). Importing this
package does not import Ray; ``start_cluster`` does, and says which extra to install without it.
"""

from djinn.cluster.launch import BackgroundRouter, Cluster, LocalNode, RayNode, start_cluster
from djinn.cluster.node import DjinnNode
from djinn.cluster.router import Backend, Migration, Router, RouterSettings

__all__ = [
    "Backend",
    "BackgroundRouter",
    "Cluster",
    "DjinnNode",
    "LocalNode",
    "Migration",
    "RayNode",
    "Router",
    "RouterSettings",
    "start_cluster",
]
