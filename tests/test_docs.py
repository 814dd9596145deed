"""The examples in the docs are real: every routes.toml snippet in them parses and validates."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.routing.routes_file import parse_routes

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def toml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in DOCS:
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)):
            blocks.append((f"{path.name}#{i}", block))
    return blocks


@pytest.mark.parametrize(("where", "block"), toml_blocks(), ids=[w for w, _ in toml_blocks()])
def test_toml_examples_parse(where, block, tmp_path):
    doc = tomllib.loads(block)
    if "route" in doc:  # a routes.toml example: it must validate too
        secret = tmp_path / "secret"
        secret.write_text("x\n")
        block = re.sub(r"/run/secrets/[\w.-]+", str(secret), block)
        # Every variable an example names (username_env, password_env) is set, as a deployment would.
        env = {name: "x" for name in re.findall(r'_env = "(\w+)"', block)}
        parse_routes(tomllib.loads(block), where, env)


def test_every_setting_is_documented():
    from gateway.settings import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"GATEWAY_{name.upper()}" in text, name


def test_every_route_key_is_documented():
    from gateway.routing.routes_file import _RouteModel

    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in _RouteModel.model_fields:
        assert f"| `{name}` |" in text, name
