"""The registry API handler, split by job: dispatch, manifests (cache, stale answers), blobs (lead, join,
stream, integrity), answers (errors, redirects, links).

May import: every layer below it and ``gateway.settings``. Only ``gateway.app`` (the composition root) imports it.
"""
