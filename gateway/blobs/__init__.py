"""Blob mechanisms with no HTTP: the shared fetch (window, pacing, gathering, merging, the board), resume
arithmetic, digest checks.

May import: every layer below it (``http``, ``observe``, ``routing``, ``net``, ``auth``, ``upstream``) and
``gateway.settings``; today it needs only ``http`` and ``observe``.
"""
