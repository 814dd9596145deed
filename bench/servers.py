"""The two servers the benchmark puts between the client and the registry: an nginx proxy and the gateway."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import IO

import httpx

from bench import procs
from tests.testbed._util import free_port

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A server under test did not start, or died."""


def tail(path: Path, lines: int = 8, width: int = 240) -> str:
    """The last lines of a log, each cut to ``width`` characters (access logs are long JSON lines)."""
    try:
        last = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "<no log>"
    return "\n".join(line if len(line) <= width else line[:width] + "..." for line in last)


def source_fingerprint(package: Path = ROOT / "gateway") -> dict[str, object]:
    """sha256 over the gateway's Python sources as they are on disk now (identifies uncommitted states too)."""
    digest = hashlib.sha256()
    files = sorted(package.rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest()[:16], "files": len(files)}


class Server:
    """A subprocess in a session of its own (so its workers can be signalled as one group), logging to a file."""

    name = "server"
    scheme = "http"
    #: the CA file its TLS answers are verified with (``scheme`` https)
    verify: Path | None = None

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(
                    f"{self.name} exited with {self.returncode()} before it answered:\n{tail(self.log_path)}"
                )
            try:
                verify: ssl.SSLContext | bool = True
                if self.verify is not None:
                    verify = ssl.create_default_context(cafile=str(self.verify))
                httpx.get(self.url + path, timeout=2.0, trust_env=False, verify=verify)
                return
            except httpx.HTTPError as exc:
                last = exc
                time.sleep(0.1)
        self.stop()
        raise ServerError(f"{self.name} did not answer {path} within {timeout:.0f}s ({last!r}):\n{tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError(f"{self.name} is not running")
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server's process and every process below it."""
        return procs.descendants(self.pid) if self.alive() else []

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # Only the process group this object created (start_new_session) is signalled.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class NginxProxy(Server):
    """nginx as a plain reverse proxy in front of the registry that follows blob redirects itself."""

    name = "nginx"

    def __init__(
        self,
        workdir: Path,
        registry_url: str,
        *,
        tls: tuple[Path, Path] | None = None,
        upstream_ca: Path | None = None,
        upstream_name: str = "registry.bench.test",
        realm: str | None = None,
    ) -> None:
        super().__init__(workdir)
        self.registry_url = registry_url
        self.conf_path = self.dir / "nginx.conf"
        #: (certificate, key): it listens with TLS (a TLS upstream for the others)
        self.tls = tls
        #: the CA an https ``registry_url`` is verified with, under the name ``upstream_name``
        self.upstream_ca = upstream_ca
        self.upstream_name = upstream_name
        #: a TLS front also serves the registry's token realm (http) over https, and names it in the
        #: challenge instead: an https upstream may not send the gateway to a plaintext realm
        self.realm = realm
        if tls is not None:
            self.scheme = "https"
            self.verify = upstream_ca

    def config(self) -> str:
        d = self.dir
        upstream_tls = self.registry_url.startswith("https://")
        registry = self.registry_url.removeprefix("http://").removeprefix("https://")
        listen = f"{LOOPBACK}:{self.port} backlog=1024"
        if self.tls is not None:
            listen += f" ssl;\n        ssl_certificate {self.tls[0]};\n        ssl_certificate_key {self.tls[1]}"
        upstream = "http://registry"
        realm_map = realm_location = challenge = ""
        if self.realm is not None and self.tls is not None:
            parts = urllib.parse.urlsplit(self.realm)
            origin = f"{parts.scheme}://{parts.netloc}"
            realm_map = (
                "map $upstream_http_www_authenticate $bench_challenge {\n"
                f'        "~^(?<head>.*){re.escape(origin)}(?<tail>.*)$" "${{head}}https://{LOOPBACK}:{self.port}${{tail}}";\n'
                "        default $upstream_http_www_authenticate;\n    }"
            )
            realm_location = f"location {parts.path} {{ proxy_pass {origin}; }}"
            challenge = (
                "proxy_hide_header WWW-Authenticate;\n            add_header WWW-Authenticate $bench_challenge always;"
            )
        if upstream_tls:
            upstream = (
                "https://registry;\n            proxy_ssl_verify on;\n            proxy_ssl_session_reuse on;\n"
                f"            proxy_ssl_trusted_certificate {self.upstream_ca};\n"
                f"            proxy_ssl_name {self.upstream_name}"
            )
        return f"""\
daemon off;
master_process on;
worker_processes auto;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 8192;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {d}/temp/client;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    keepalive_requests 100000;

    {realm_map}

    upstream registry {{
        server {registry};
        keepalive 64;
    }}

    server {{
        listen {listen};

        location = /__bench_health {{
            return 200 "ok";
        }}

        {realm_location}

        location /v2/ {{
            {challenge}
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            proxy_read_timeout 300s;
            # Blob GETs answer 307 to the CDN: follow it here instead of handing it to the client.
            proxy_intercept_errors on;
            error_page 301 302 307 = @follow;
        }}

        location @follow {{
            set $saved_redirect_location '$upstream_http_location';
            proxy_pass $saved_redirect_location;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The CDN must not see the registry token (it answers 400, like S3 signed URLs).
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

    def start(self, timeout: float = 15.0) -> NginxProxy:
        for sub in ("temp/client", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf_path.write_text(self.config())
        self._spawn(["nginx", "-p", f"{self.dir}/", "-c", str(self.conf_path), "-e", str(self.dir / "error.log")])
        try:
            self._wait_ready("/__bench_health", timeout)
        except ServerError as exc:
            raise ServerError(f"{exc}\n{tail(self.dir / 'error.log')}") from None
        return self

    def worker_pids(self) -> list[int]:
        return procs.descendants(self.pid, include_root=False) if self.alive() else []

    def version(self) -> str:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
        return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


class Gateway(Server):
    """``python -m gateway`` (or the command given with ``--gateway-cmd``) with one default route."""

    name = "gateway"

    def __init__(
        self,
        workdir: Path,
        registry_url: str,
        *,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        command: str | None = None,
        route_options: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        #: more keys of the route, as TOML values (``{"allow_private_addresses": "true"}``)
        self.route_options = dict(route_options or {})
        self.registry_url = registry_url
        self.workers = workers
        self.extra_env = dict(env or {})
        self.command = command
        self.routes_path = self.dir / "routes.toml"
        self.argv: list[str] = []
        self.source: dict[str, object] = {}

    def routes(self) -> str:
        return f"""\
# generated by python -m bench: every request goes to the test bed's hub registry
[[route]]
name = "hub.test"
upstream = "{self.registry_url}"
default = true
library = true
""" + "".join(f"{key} = {value}\n" for key, value in self.route_options.items())

    def build_argv(self) -> list[str]:
        """The command line. ``--gateway-cmd`` may use {routes} {host} {port} {workers} {python};
        without {port} the usual options are appended."""
        values = {
            "routes": str(self.routes_path),
            "host": LOOPBACK,
            "port": str(self.port),
            "workers": str(self.workers or 1),
            "python": sys.executable,
        }
        standard = ["--routes", values["routes"], "--host", LOOPBACK, "--port", values["port"]]
        if self.workers is not None:
            standard += ["--workers", values["workers"]]
        if self.command is None:
            return [sys.executable, "-m", "gateway", *standard]
        argv = [part.format(**values) for part in shlex.split(self.command)]
        if "{port}" not in self.command:
            argv += standard
        return argv

    def start(self, timeout: float = 30.0) -> Gateway:
        self.routes_path.write_text(self.routes())
        self.port = free_port()
        self.argv = self.build_argv()
        self.source = source_fingerprint()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.update(
            {
                "GATEWAY_ROUTES": str(self.routes_path),
                "GATEWAY_HOST": LOOPBACK,
                "GATEWAY_PORT": str(self.port),
            }
        )
        if self.workers is not None:
            env["GATEWAY_WORKERS"] = str(self.workers)
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
        try:
            self._spawn(self.argv, env)
        except OSError as exc:
            raise ServerError(f"gateway command {shlex.join(self.argv)} could not start: {exc}") from None
        self._wait_ready("/v2/", timeout)
        self._wait_for_workers(timeout)
        return self

    def _wait_for_workers(self, timeout: float) -> None:
        """With several workers, wait until all of them run (the parent answers once the first one is up)."""
        if not self.workers or self.workers < 2:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.pids()) < self.workers + 1:
            time.sleep(0.1)
        time.sleep(0.5)

    def check(self) -> None:
        """Raise :class:`ServerError` when the gateway has died."""
        if not self.alive():
            raise ServerError(f"gateway exited with {self.returncode()}:\n{tail(self.log_path)}")
