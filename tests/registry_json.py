"""The one strict check of a registry error answer, shared by every test layer.

distribution-spec "Error Codes": the body is ``{"errors": [{"code", "message", "detail"}]}``
and nothing else, served as JSON. Every test that looks at an error goes through here, so a
relaxed copy cannot hide a malformed answer.
"""

from __future__ import annotations

import json
from typing import Any


def check_registry_errors(
    content_type: str | None, body: bytes, context: str = "", *, require_detail: bool = True
) -> list[dict[str, Any]]:
    """The ``errors`` list of a registry error answer; fails the test unless the answer is one.

    ``require_detail=False`` for answers that may be an upstream's own body relayed verbatim:
    distribution leaves ``detail`` out, and the spec makes it optional.
    """
    assert content_type == "application/json", context
    doc = json.loads(body)
    assert isinstance(doc, dict), context
    assert set(doc) == {"errors"}, context
    errors = doc["errors"]
    assert isinstance(errors, list), context
    assert errors, context
    for error in errors:
        assert isinstance(error, dict), context
        assert {"code", "message", "detail"} <= set(error) | ({"detail"} if not require_detail else set()), context
        assert isinstance(error["code"], str), context
        assert isinstance(error["message"], str), context
    return errors


def registry_errors(resp: Any, *, require_detail: bool = True) -> list[dict[str, Any]]:
    """The same check for an ``httpx.Response``."""
    context = f"{resp.status_code} {resp.text}"
    return check_registry_errors(resp.headers.get("content-type"), resp.content, context, require_detail=require_detail)
