"""Upstream authorization: challenges, token fetch and cache, an authorizer per mode, grants, credential helpers.

May import: ``gateway.http``, ``gateway.observe``, ``gateway.routing``, ``gateway.net``, ``gateway.settings``.
"""
