"""End-to-end test bed for registry-gateway: real distribution registries, token server, nginx CDN, images.

Usage::

    with Testbed.start(workdir) as bed:
        bed.hub.url, bed.images["alpine"].digest, bed.tokens.requests, ...
"""

from ._util import TestbedError
from .bed import Credentials, Testbed, Upstream, image_specs
from .cdn import Cdn, CdnRequest
from .images import Image, ImageSpec
from .tokens import Scope, TokenRequest, TokenServer, libtrust_key_id

__all__ = [
    "Cdn",
    "CdnRequest",
    "Credentials",
    "Image",
    "ImageSpec",
    "Scope",
    "Testbed",
    "TestbedError",
    "TokenRequest",
    "TokenServer",
    "Upstream",
    "image_specs",
    "libtrust_key_id",
]
