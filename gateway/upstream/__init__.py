"""The upstream client (mirrors, failover, redirect hops; asks ``auth`` at every hop) and logins passed through.

May import: every layer below it (``http``, ``observe``, ``routing``, ``net``, ``auth``) and ``gateway.settings``.
"""
