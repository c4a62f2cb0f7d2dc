"""The gateway: holds client WebSocket connections and carries out the workers' commands.

``gateway.protocol`` is the internal wire format it accepts, and
``gateway.client`` the small client workers use to speak it.
"""
