"""Credentials from a docker credential helper (``helper = "pass"`` on a ``[[route.credentials]]``).

The docker-credential-helpers protocol (github.com/docker/docker-credential-helpers,
README "Usage" and ``credentials/credentials.go``): the program ``docker-credential-<name>``
is run with one argument, the action; for ``get`` it reads the server address (the
registry host, e.g. ``registry-1.docker.io`` or ``127.0.0.1:5000``) on standard input and
writes ``{"ServerURL": ..., "Username": ..., "Secret": ...}`` on standard output, or exits
non-zero with a message (``credentials not found in native keychain``) when it has none.

How the gateway uses it:

- never on the event loop: ``asyncio.create_subprocess_exec``, bounded by a timeout
  (``GATEWAY_CREDENTIAL_HELPER_TIMEOUT``); a helper that overruns is killed;
- one call at a time per account: concurrent requests wait for the same call (a task,
  shielded, so that one requester going away does not cancel it for the others);
- the answer is cached per account until the upstream's token endpoint refuses it
  (``forget``), then the helper is asked again;
- a failure (not on ``PATH``, non-zero exit, bad JSON, timeout) is a ``502 UNAVAILABLE``
  naming the helper and the account. Standard output holds the secret and is never
  logged or quoted; standard error is logged, truncated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.http.errors import UNAVAILABLE, RegistryError
from gateway.routing.policy import Origin
from gateway.routing.routes import Credentials

logger = logging.getLogger("gateway.credential_helper")

PROGRAM_PREFIX = "docker-credential-"  # docker-credential-helpers: the program is docker-credential-<name>
MAX_ANSWER = 64 << 10  # a real answer is a few hundred bytes (a cloud token a few KiB)
STDERR_LOGGED = 200  # characters of a failing helper's standard error that are logged
FAILURE_SECONDS = 5.0  # a helper that failed is not run again for this long (its error stands)


def server_address(origin: Origin) -> str:
    """What the helper is asked for: the registry host, with its port unless it is the scheme's default
    (as docker does: ``registry-1.docker.io``, ``127.0.0.1:5000``)."""
    scheme, host, port = origin
    netloc = f"[{host}]" if ":" in host else host
    return netloc if port == (443 if scheme == "https" else 80) else f"{netloc}:{port}"


@dataclass(frozen=True, slots=True)
class _Key:
    identity: str
    helper: str
    server: str


class CredentialHelpers:
    """The answers of credential helpers, per account, with one call in flight per account."""

    def __init__(self, timeout: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._answers: dict[_Key, Credentials] = {}
        self._inflight: dict[_Key, asyncio.Task[Credentials]] = {}
        # A helper that failed is not run again for FAILURE_SECONDS: every request of a busy
        # route would otherwise start a process that fails the same way.
        self._failures: dict[_Key, tuple[float, RegistryError]] = {}
        #: helper runs started (for tests and the curious; never the answers)
        self.calls = 0

    @staticmethod
    def _key(credentials: Credentials, server: str) -> _Key:
        assert credentials.helper is not None
        return _Key(credentials.identity, credentials.helper, server)

    async def resolve(self, credentials: Credentials, origin: Origin) -> Credentials:
        """``credentials`` themselves, or, for a helper's account, the helper's answer for ``origin``."""
        if credentials.helper is None:
            return credentials
        key = self._key(credentials, server_address(origin))
        cached = self._answers.get(key)
        if cached is not None:
            return cached
        failure = self._failures.get(key)
        if failure is not None and failure[0] > self._clock():
            error = failure[1]
            raise RegistryError(error.status, error.code, error.message, error.detail)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._call(key, credentials))
            self._inflight[key] = task
        # shield: a caller that goes away must not cancel the call others wait for.
        return await asyncio.shield(task)

    def forget(self, credentials: Credentials, origin: Origin, refused: Credentials) -> None:
        """The upstream refused ``refused``: drop it, unless a newer answer already replaced it."""
        if credentials.helper is None:
            return
        key = self._key(credentials, server_address(origin))
        if self._answers.get(key) == refused:
            del self._answers[key]

    async def _call(self, key: _Key, credentials: Credentials) -> Credentials:
        try:
            answer = await self._run(key, credentials)
        except RegistryError as exc:
            self._failures[key] = (self._clock() + FAILURE_SECONDS, exc)
            raise
        finally:
            self._inflight.pop(key, None)
        self._failures.pop(key, None)
        self._answers[key] = answer
        return answer

    async def _run(self, key: _Key, credentials: Credentials) -> Credentials:
        account = credentials.name or credentials.identity
        program = PROGRAM_PREFIX + key.helper
        where = f"the credential helper {program} (account {account})"

        def failed(reason: str) -> RegistryError:
            return RegistryError(
                502, UNAVAILABLE, f"{where} failed: {reason}", detail={"helper": program, "account": account}
            )

        path = shutil.which(program)
        if path is None:
            raise failed(f"{program} is not on PATH")
        self.calls += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                "get",  # docker-credential-helpers: the action is the only argument
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(os.environ),
            )
        except OSError as exc:
            raise failed(f"cannot run it: {exc.strerror}") from None
        try:
            # docker-credential-helpers: "get" reads the server address on standard input.
            async with asyncio.timeout(self.timeout):
                stdout, stderr = await proc.communicate(key.server.encode())
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise failed(f"no answer within {self.timeout:g} seconds") from None
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            # Standard error only: standard output may hold a secret even on failure.
            message = stderr.decode("utf-8", "replace").strip().replace("\n", " ")[:STDERR_LOGGED]
            logger.warning("%s exited with %s: %s", where, proc.returncode, message)
            raise failed(f"it exited with status {proc.returncode}")
        return self._parse(stdout, credentials.name, failed)

    @staticmethod
    def _parse(stdout: bytes, name: str | None, failed: Callable[[str], RegistryError]) -> Credentials:
        if len(stdout) > MAX_ANSWER:
            raise failed("its answer is too large")
        try:
            doc = json.loads(stdout)
        except (ValueError, UnicodeDecodeError):
            raise failed("its answer is not JSON") from None  # never quoted: it may hold the secret
        if not isinstance(doc, dict):
            raise failed("its answer is not a JSON object")
        username, secret = doc.get("Username"), doc.get("Secret")
        if not isinstance(username, str) or not username or not isinstance(secret, str) or not secret:
            raise failed("its answer lacks a Username or a Secret")
        if username == "<token>":
            # docker-credential-helpers: "<token>" marks an identity (refresh) token for docker's own
            # OAuth2 flow, not a password for the token endpoint's Basic authentication.
            raise failed("it answered an identity token (Username <token>), which the gateway does not use")
        # The account keeps its name: its identity stays account:<name> in caches, logs and metrics.
        return Credentials(username=username, password=secret, name=name)
