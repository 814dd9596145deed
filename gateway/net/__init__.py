"""The network below the upstream client: the transport, address guards, egress, breakers, failures as errors.

May import: ``gateway.http``, ``gateway.observe``, ``gateway.routing``, ``gateway.settings``.
"""
