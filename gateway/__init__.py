"""registry-gateway: a streaming pull-through gateway for container registries."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
