"""The examples of docs/clients.md, adapted to the test gateway (plain HTTP on 127.0.0.1)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "clients.md"
DOC_HOST = "mirror.example.com"


def example(name: str) -> str:
    """The fenced block after ``<!-- example: name -->`` in docs/clients.md."""
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", GUIDE.read_text(), re.S)
    if match is None:
        raise LookupError(f"docs/clients.md has no example {name!r}")
    return match.group(1)


def adapt(text: str, port: int, *, scheme: bool = True) -> str:
    """Swap the documented host names for the test gateway's (``ghcr.mirror.example.com`` -> ``ghcr.gw.test:port``)."""
    if scheme:
        text = text.replace(f"https://{DOC_HOST}", f"http://gw.test:{port}")
    text = re.sub(rf"\b([a-z0-9-]+)\.{re.escape(DOC_HOST)}", rf"\1.gw.test:{port}", text)
    return text.replace(DOC_HOST, f"gw.test:{port}")
