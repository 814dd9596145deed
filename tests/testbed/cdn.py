"""A CDN-like static file server (real nginx) in front of a registry's filesystem storage root.

distribution's ``redirect`` storage middleware redirects blob GET/HEAD to ``<baseurl scheme+host><driver path>``,
e.g. ``/docker/registry/v2/blobs/sha256/ab/ab12.../data``, which is the file's path below the filesystem
driver's root directory, so nginx simply serves that directory. Like an S3 pre-signed URL, a request that also
carries an ``Authorization`` header is refused with 400.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ._util import LOOPBACK, ManagedProcess, TestbedError, free_port, wait_until

NGINX_BINARY = "nginx"

_S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\\n<Error><Code>InvalidArgument</Code>'
    "<Message>Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string "
    "parameter or the Authorization header should be specified</Message></Error>\\n"
)


_BLOB_PATH = re.compile(r"/docker/registry/v2/blobs/(?P<alg>[a-z0-9]+)/[0-9a-f]{2}/(?P<hex>[0-9a-f]+)/data")


@dataclass(frozen=True)
class CdnRequest:
    """One request nginx logged."""

    time: float
    method: str
    uri: str
    status: int
    bytes: int
    range: str | None
    authorization: bool

    @property
    def digest(self) -> str | None:
        """The blob digest for blob paths."""
        match = _BLOB_PATH.match(self.uri.split("?", 1)[0])
        return f"{match.group('alg')}:{match.group('hex')}" if match else None


class Cdn:
    def __init__(self, workdir: Path, root: Path) -> None:
        self.dir = workdir / "cdn"
        self.root = root
        self.port = 0
        self.conf_path = self.dir / "nginx.conf"
        self.log_path = self.dir / "error.log"
        self.access_log_path = self.dir / "access.log"
        self._proc: ManagedProcess | None = None
        self._log_offset = 0
        self._lock = threading.Lock()
        for sub in ("temp/client", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def config(self) -> str:
        d = self.dir
        workers = max(2, min(4, os.cpu_count() or 2))
        return f"""\
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {d}/nginx.pid;
error_log {self.log_path} warn;
worker_rlimit_nofile 8192;

events {{
    worker_connections 2048;
    multi_accept on;
}}

http {{
    default_type application/octet-stream;
    types {{ }}
    log_format testbed escape=json '{{"time":$msec,"method":"$request_method","uri":"$request_uri",'
                                   '"status":$status,"bytes":$body_bytes_sent,"range":"$http_range",'
                                   '"authorization":"$http_authorization"}}';
    access_log {self.access_log_path} testbed;
    log_not_found off;
    server_tokens off;

    sendfile on;
    sendfile_max_chunk 4m;
    tcp_nopush on;
    tcp_nodelay on;
    aio threads;
    directio off;
    output_buffers 2 1m;
    open_file_cache max=1000 inactive=60s;
    open_file_cache_valid 30s;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    reset_timedout_connection on;
    gzip off;
    etag on;
    max_ranges 16;

    client_body_temp_path {d}/temp/client;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;

    server {{
        listen {LOOPBACK}:{self.port} reuseport backlog=1024;
        server_name cdn;
        root {self.root};
        autoindex off;

        location / {{
            if ($http_authorization) {{
                rewrite ^ /__s3_invalid_argument last;
            }}
            limit_except GET {{
                deny all;
            }}
            try_files $uri =404;
        }}

        location = /__s3_invalid_argument {{
            internal;
            default_type application/xml;
            return 400 '{_S3_ERROR}';
        }}
    }}
}}
"""

    def start(self, timeout: float = 10.0) -> None:
        if shutil.which(NGINX_BINARY) is None:
            raise TestbedError(f"{NGINX_BINARY} not found (apt-get install nginx)")
        for _attempt in range(3):
            self.port = free_port()
            self.conf_path.write_text(self.config())
            self._proc = ManagedProcess(
                "nginx-cdn",
                [NGINX_BINARY, "-p", str(self.dir) + "/", "-c", str(self.conf_path), "-e", str(self.log_path)],
                log_path=self.dir / "nginx.stdout.log",
                cwd=self.dir,
            )
            proc = self._proc

            def ready(proc: ManagedProcess = proc) -> bool:
                proc.check_alive()
                return httpx.get(self.url + "/", timeout=2).status_code in (403, 404)

            try:
                wait_until(ready, timeout=timeout, what=f"nginx on {self.url}")
            except TestbedError:
                proc.stop()
                self._proc = None
                if "Address already in use" not in self.log_path.read_text(errors="replace"):
                    raise
            else:
                return
        raise TestbedError("nginx could not bind a port")

    # ----------------------------------------------------------------- stats (from nginx's access log)
    @property
    def requests(self) -> list[CdnRequest]:
        """Requests logged since start or the last :meth:`reset` (nginx logs when a response completes)."""
        with self._lock:
            try:
                with self.access_log_path.open("rb") as log:
                    log.seek(self._log_offset)
                    data = log.read()
            except FileNotFoundError:
                return []
        out: list[CdnRequest] = []
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line still being written
            out.append(
                CdnRequest(
                    time=float(entry["time"]),
                    method=entry["method"],
                    uri=entry["uri"],
                    status=int(entry["status"]),
                    bytes=int(entry["bytes"]),
                    range=entry["range"] or None,
                    authorization=bool(entry["authorization"]),
                )
            )
        return out

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[CdnRequest]:
        """Wait until at least ``count`` requests are logged (responses are logged just after they finish)."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.requests
            if len(current) >= count or time.monotonic() > deadline:
                return current
            time.sleep(0.01)

    def reset(self) -> None:
        with self._lock:
            try:
                self._log_offset = self.access_log_path.stat().st_size
            except FileNotFoundError:
                self._log_offset = 0

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
