"""HTTP vocabulary: ASGI types, registry JSON errors, forwarded headers, small HTTP helpers.

The bottom layer: it imports nothing else of the gateway, so every layer above can speak it.
"""
