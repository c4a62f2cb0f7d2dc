"""The gateway: holds client WebSocket connections and carries out the workers' commands.

``gateway.protocol`` is the internal wire format it accepts, and
``gateway.link`` the link workers (and publishers) use to speak it.
"""
