"""A real credential helper end to end: Debian's ``docker-credential-pass`` over ``pass`` and GnuPG.

The test makes a throwaway GnuPG key and password store, stores the test bed's private user's
credentials with ``docker-credential-pass store`` (docker-credential-helpers protocol: the JSON
``{"ServerURL", "Username", "Secret"}`` on standard input), and runs a real gateway whose only
account says ``helper = "pass"``. Then the user's password is rotated on the token server and in
the store at once: the next token fetch is refused (401), the gateway asks the helper again and
the pull succeeds. Last, a store that answers a wrong secret is refused twice: a 502.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.clients import Skopeo, verify_dir_copy
from tests.e2e.conftest import require
from tests.support import run_gateway
from tests.testbed.bed import Testbed
from tests.testbed.tokens import PRIVATE_PASSWORD, PRIVATE_USER

ROTATED = "ghcr-pass-rotated"
WRONG = "not-the-password-any-more"


class PassStore:
    """A throwaway GNUPGHOME, key and PASSWORD_STORE_DIR for ``docker-credential-pass``."""

    def __init__(self, root: Path) -> None:
        self.env = {
            **os.environ,
            "GNUPGHOME": str(root / "gnupg"),
            "PASSWORD_STORE_DIR": str(root / "store"),
        }
        (root / "gnupg").mkdir(mode=0o700)
        self.run(
            "gpg",
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            "test@example.invalid",
            "default",
            "default",
            "never",
        )
        listing = self.run("gpg", "--batch", "--with-colons", "--list-keys", "test@example.invalid")
        fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        self.run("pass", "init", fingerprint)

    def run(self, *argv: str, stdin: str = "") -> str:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=self.env, timeout=60)
        assert done.returncode == 0, f"{argv[0]}: {done.stderr}"
        return done.stdout

    def store(self, server: str, username: str, secret: str) -> None:
        # docker-credential-helpers protocol: "store" reads {"ServerURL","Username","Secret"} on stdin.
        payload = json.dumps({"ServerURL": server, "Username": username, "Secret": secret})
        self.run("docker-credential-pass", "store", stdin=payload)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=self.env, capture_output=True, timeout=30)


@pytest.fixture
def pass_store() -> Iterator[PassStore]:
    require("docker-credential-pass", "pass", "gpg", "gpgconf")
    # A short directory: gpg-agent's socket path must fit in a sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="gw-pass-"))
    store = PassStore(root)
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_real_helper_gives_the_account_and_a_rotated_secret_is_picked_up_after_a_401(
    skopeo: Skopeo, testbed: Testbed, pass_store: PassStore, tmp_path: Path
) -> None:
    server = testbed.ghcr.host_port  # what the gateway asks the helper for: the registry host
    pass_store.store(server, PRIVATE_USER, PRIVATE_PASSWORD)
    routes = f"""
[[route]]
name = "ghcr.io"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
default = true

[[route.credentials]]
name = "pass-robot"
helper = "pass"
"""
    env = {key: pass_store.env[key] for key in ("PATH", "GNUPGHOME", "PASSWORD_STORE_DIR")}
    tokens = testbed.tokens
    try:
        with run_gateway(routes, tmp_path / "gw", env=env) as gw:
            tokens.reset()
            dest = skopeo.copy_all(f"127.0.0.1:{gw.port}/private/secret-app:v1", tmp_path / "secret")
            verify_dir_copy(dest, testbed.images["secret-app"])
            first = [(r.basic_user, r.status) for r in tokens.requests]

            # Rotation: the token server and the store change the password together. The gateway's
            # cached answer is refused at the next token fetch (a new scope), the helper is asked again.
            tokens.users[PRIVATE_USER] = ROTATED
            pass_store.store(server, PRIVATE_USER, ROTATED)
            tokens.reset()
            dest = skopeo.copy_all(f"127.0.0.1:{gw.port}/org/app:v1", tmp_path / "app")
            verify_dir_copy(dest, testbed.images["app"])
            rotated = [(r.basic_user, r.status) for r in tokens.requests]

            # A store whose secret is wrong: refused, asked again, refused again: the pull fails.
            tokens.users[PRIVATE_USER] = "yet-another-password"
            pass_store.store(server, PRIVATE_USER, WRONG)
            tokens.reset()
            with pytest.raises(AssertionError, match="(?i)502|unauthorized|refused"):
                skopeo.copy_all(f"127.0.0.1:{gw.port}/private/nothing:v1", tmp_path / "none")
            refused = [(r.basic_user, r.status) for r in tokens.requests]
            log = gw.log_lines()
    finally:
        tokens.users[PRIVATE_USER] = PRIVATE_PASSWORD
    assert first
    assert set(first) == {(PRIVATE_USER, 200)}
    # The old password once (401), then the helper's new answer (200) from then on.
    assert rotated[0] == (PRIVATE_USER, 401)
    assert set(rotated[1:]) == {(PRIVATE_USER, 200)}
    assert refused
    assert {status for _, status in refused} == {401}
    errors = [json.loads(line) for line in log if '"event":"access"' in line and '"status":502' in line]
    assert errors
    assert {e["error"] for e in errors} == {"UNAUTHORIZED"}
    leaked = [line for line in log if any(s in line for s in (PRIVATE_PASSWORD, ROTATED, WRONG))]
    assert not leaked
