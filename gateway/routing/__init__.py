"""Routing: routes.toml, OCI names, which route a request takes, request rules, access, policy, budget rules.

Pure decisions with no upstream I/O. May import: ``gateway.http``, ``gateway.observe``.
"""
