"""What every role of the cluster needs and no role owns.

The cluster key and how links authenticate (``keys``, ``handshakes``), how a
process reports an operator's mistake and logs (``cli``, ``logs``). The roles
(register, gateway, businessworker, web) import from here; nothing here imports
a role.
"""
