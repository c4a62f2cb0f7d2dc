"""The register: the discovery service of the cluster.

Gateways announce their internal address to it; workers learn every gateway
from it and link to each. See ``register.protocol`` for the messages.
"""
