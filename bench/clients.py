"""The load the benchmark sends: curl for blobs (not Python-bound), wrk for manifests, httpx for small checks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
MANIFEST_ACCEPT = ",".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_CURL_FORMAT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total} %{num_redirects}\\n"


class ClientError(RuntimeError):
    """A client saw something other than a complete, correct answer."""


def require_tools(names: Sequence[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SystemExit(f"bench: missing tools: {', '.join(missing)} (scripts/install installs them)")


class ClientAuth:
    """A client's Bearer token, fetched from the token server like docker would, renewed before it expires."""

    def __init__(self, realm: str, service: str, scopes: Sequence[str]) -> None:
        self.realm = realm
        self.service = service
        self.scopes = list(scopes)
        self._token = ""
        self._expires = 0.0
        self.fetched = 0

    def token(self) -> str:
        if time.monotonic() > self._expires:
            params: list[tuple[str, str | int | float | bool | None]] = [("service", self.service)]
            params += [("scope", scope) for scope in self.scopes]
            response = httpx.get(self.realm, params=params, timeout=30, trust_env=False)
            response.raise_for_status()
            body = response.json()
            self._token = str(body["token"])
            # renew at half the lifetime, so no measurement ever runs with an expired token
            self._expires = time.monotonic() + float(body.get("expires_in", 60)) / 2
            self.fetched += 1
        return self._token


@dataclass(frozen=True)
class Target:
    """One way to reach the registry: ``direct`` (token + client follows the redirect), ``nginx``, ``gateway``."""

    name: str
    base_url: str
    auth: ClientAuth | None
    follow_redirects: bool

    def curl_args(self) -> list[str]:
        args = ["-L"] if self.follow_redirects else []
        if self.auth is not None:
            # curl -L keeps Authorization to the first host only (another host or port does not get it)
            args += ["-H", f"Authorization: Bearer {self.auth.token()}"]
        return args

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth.token()}"} if self.auth is not None else {}


@dataclass(frozen=True)
class Transfer:
    """One curl download."""

    status: int
    size: int
    ttfb: float
    total: float
    redirects: int

    @property
    def bytes_per_second(self) -> float:
        return self.size / self.total if self.total > 0 else 0.0


def _curl_argv(target: Target, path: str, output: str = "/dev/null") -> list[str]:
    return [
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--http1.1",
        "--max-time",
        "600",
        "--output",
        output,
        "--write-out",
        _CURL_FORMAT,
        *target.curl_args(),
        target.base_url + path,
    ]


def _parse_transfer(target: Target, stdout: bytes, stderr: bytes, returncode: int, expected_size: int) -> Transfer:
    fields = stdout.decode(errors="replace").split()
    if returncode != 0 or len(fields) != 5:
        detail = stderr.decode(errors="replace").strip() or stdout.decode(errors="replace").strip()
        raise ClientError(f"{target.name}: curl exited with {returncode}: {detail}")
    transfer = Transfer(int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3]), int(fields[4]))
    if transfer.status != 200 or transfer.size != expected_size:
        raise ClientError(f"{target.name}: HTTP {transfer.status}, {transfer.size} bytes instead of {expected_size}")
    if not target.follow_redirects and transfer.redirects:
        raise ClientError(f"{target.name}: the client was redirected")
    return transfer


def download(target: Target, path: str, expected_size: int) -> Transfer:
    """One GET to /dev/null, timed by curl."""
    done = subprocess.run(_curl_argv(target, path), capture_output=True, check=False)
    return _parse_transfer(target, done.stdout, done.stderr, done.returncode, expected_size)


@dataclass(frozen=True)
class ParallelRun:
    transfers: list[Transfer]
    wall_seconds: float
    #: user + system CPU seconds of the curl processes
    client_cpu_seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(t.size for t in self.transfers)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parallel_downloads(target: Target, path: str, expected_size: int, streams: int) -> ParallelRun:
    """``streams`` curl processes started at once; wall time from the first start to the last exit."""
    argvs = [_curl_argv(target, path) for _ in range(streams)]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    outputs = [proc.communicate() for proc in running]
    wall = time.perf_counter() - started
    client_cpu = _children_cpu() - cpu_before
    transfers = [
        _parse_transfer(target, out, err, proc.returncode or 0, expected_size)
        for proc, (out, err) in zip(running, outputs, strict=True)
    ]
    return ParallelRun(transfers, wall, client_cpu)


#: a pipe of 1 MiB between curl and the hasher: fewer wake-ups per GiB than the default 64 KiB
_PIPE_BYTES = 1 << 20


def hasher_argv() -> list[str]:
    """The fastest sha256 at hand reading stdin: ``openssl dgst`` (SHA extensions, ~3x coreutils' speed)."""
    if shutil.which("openssl"):
        return ["openssl", "dgst", "-sha256", "-r"]
    return ["sha256sum", "-b"]


@dataclass(frozen=True)
class HerdClient:
    """One client of a herd: curl piping the body into a hasher."""

    #: seconds from the herd's first start to this client's start
    started: float
    #: seconds from the herd's first start until curl had the whole body (its own time_total)
    done: float
    transfer: Transfer | None
    digest: str | None
    error: str | None

    def ok(self, expected_digest: str) -> bool:
        return self.error is None and self.digest == expected_digest


@dataclass(frozen=True)
class HerdRun:
    clients: list[HerdClient]
    #: from the first start until every client had exited: the time until every client was done
    wall_seconds: float
    #: user + system CPU seconds of the curl and hasher processes
    client_cpu_seconds: float

    def failures(self, expected_digest: str) -> list[HerdClient]:
        return [client for client in self.clients if not client.ok(expected_digest)]

    @property
    def start_spread(self) -> float:
        return max(c.started for c in self.clients) if self.clients else 0.0


def _herd_pair(argv: list[str], hash_argv: list[str]) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """curl writing the body into a pipe, the hasher reading it; the parent keeps neither end."""
    read_end, write_end = os.pipe()
    try:
        # over /proc/sys/fs/pipe-max-size (or not Linux), the default size works too
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        hasher = subprocess.Popen(hash_argv, stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        curl = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(read_end)
        os.close(write_end)
    return curl, hasher


def herd(
    target: Target,
    path: str,
    expected_size: int,
    count: int,
    *,
    spread: float = 0.0,
    nice: int = 0,
    max_seconds: float = 600.0,
) -> HerdRun:
    """``count`` clients GET the same blob, started evenly over ``spread`` seconds (0: all at once), each
    ``curl | hasher`` (``nice``-d, so the clients yield the cores to the servers under test). Never raises
    for one client's failure: every client's outcome is in the run."""
    prefix = ["nice", "-n", str(nice)] if nice else []
    argv = [
        *prefix,
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--http1.1",
        "--max-time",
        str(round(max_seconds)),
        "--output",
        "-",
        "--write-out",
        "%{stderr}" + _CURL_FORMAT,
        *target.curl_args(),
        target.base_url + path,
    ]
    hash_argv = [*prefix, *hasher_argv()]
    cpu_before = _children_cpu()
    pairs: list[tuple[float, subprocess.Popen[bytes], subprocess.Popen[bytes]]] = []
    started = time.perf_counter()
    try:
        for n in range(count):
            at = spread * n / (count - 1) if count > 1 and spread > 0 else 0.0
            delay = started + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pairs.append((time.perf_counter() - started, *_herd_pair(argv, hash_argv)))
        outcomes = []
        for offset, curl, hasher in pairs:
            _, curl_err = curl.communicate()
            hash_out, hash_err = hasher.communicate()
            outcomes.append((offset, time.perf_counter() - started, curl, curl_err, hasher, hash_out, hash_err))
    except BaseException:
        for _, curl, hasher in pairs:
            for proc in (curl, hasher):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        raise
    # Reaped in start order: the last reap comes right after the last exit, whoever exited last.
    wall = max((reaped for _, reaped, *_ in outcomes), default=0.0)
    client_cpu = _children_cpu() - cpu_before
    clients: list[HerdClient] = []
    for offset, _, curl, curl_err, hasher, hash_out, hash_err in outcomes:
        # --write-out goes to stderr (stdout is the body): its line comes last, after any error curl printed
        err_lines = curl_err.decode(errors="replace").strip().splitlines() or [""]
        transfer: Transfer | None = None
        error: str | None = None
        try:
            detail = "\n".join(err_lines[:-1]).encode()
            transfer = _parse_transfer(target, err_lines[-1].encode(), detail, curl.returncode or 0, expected_size)
        except ClientError as exc:
            error = str(exc)
        digest = None
        fields = hash_out.decode(errors="replace").split()
        if hasher.returncode == 0 and fields:
            digest = "sha256:" + fields[0].lower()
        elif error is None:
            error = f"the hasher exited with {hasher.returncode}: {hash_err.decode(errors='replace').strip()}"
        done = offset + transfer.total if transfer is not None else wall
        clients.append(HerdClient(offset, done, transfer, digest, error))
    return HerdRun(clients, wall, client_cpu)


def blob_sha256(target: Target, path: str) -> tuple[str, int]:
    """The sha256 and size of one whole download (curl's body read through a pipe)."""
    argv = [a for a in _curl_argv(target, path, output="-") if a not in ("--write-out", _CURL_FORMAT)]
    digest = hashlib.sha256()
    size = 0
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as curl:
        assert curl.stdout is not None
        assert curl.stderr is not None
        while chunk := curl.stdout.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        err = curl.stderr.read().decode(errors="replace").strip()
    if curl.returncode != 0:
        raise ClientError(f"{target.name}: curl exited with {curl.returncode}: {err}")
    return "sha256:" + digest.hexdigest(), size


def manifest_get(target: Target, path: str) -> httpx.Response:
    headers = {"Accept": MANIFEST_ACCEPT, **target.headers()}
    return httpx.get(target.base_url + path, headers=headers, timeout=30, trust_env=False)


def count_requests(target: Target, path: str, total: int, concurrency: int) -> dict[str, int]:
    """``total`` manifest GETs from ``concurrency`` threads; status code -> count."""
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    remaining = [total]
    headers = {"Accept": MANIFEST_ACCEPT, **target.headers()}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=target.base_url, headers=headers, timeout=30, trust_env=False, limits=limits) as client:

        def worker() -> None:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                try:
                    key = str(client.get(path).status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return statuses


@dataclass(frozen=True)
class LoadRun:
    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk(
    target: Target,
    path: str,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    log: Path | None = None,
) -> LoadRun:
    """wrk with a fixed duration; the Lua script reports requests, errors and latency percentiles as JSON."""
    argv = [
        "wrk",
        f"--threads={min(threads, connections)}",
        f"--connections={connections}",
        f"--duration={max(1, round(seconds))}s",
        "--timeout=10s",
        f"--script={WRK_SCRIPT}",
        "--header",
        f"Accept: {MANIFEST_ACCEPT}",
    ]
    for name, value in target.headers().items():
        argv += ["--header", f"{name}: {value}"]
    argv.append(target.base_url + path)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ wrk ... {target.name} c={connections} {seconds}s\n{done.stdout}{done.stderr}\n")
    report = next((line for line in done.stdout.splitlines() if line.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or report is None:
        raise ClientError(f"{target.name}: wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout}")
    data = json.loads(report.removeprefix("BENCH_JSON "))
    errors = {key: int(data[key]) for key in ("connect", "read", "write", "status", "timeout")}
    return LoadRun(
        requests=int(data["requests"]),
        seconds=float(data["duration_us"]) / 1e6,
        errors=errors,
        p50_ms=float(data["p50_us"]) / 1000,
        p90_ms=float(data["p90_us"]) / 1000,
        p99_ms=float(data["p99_us"]) / 1000,
        max_ms=float(data["max_us"]) / 1000,
    )


def hey(target: Target, path: str, *, connections: int, seconds: float, log: Path | None = None) -> LoadRun:
    """hey (Go's net/http client) with a fixed duration: the fallback when wrk's strict HTTP parser refuses a path."""
    argv = ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(connections), "-t", "10", "-disable-compression"]
    argv += ["-cpus", "1"]  # like wrk's single thread: leave the other core to the servers
    argv += ["-H", f"Accept: {MANIFEST_ACCEPT}"]
    for name, value in target.headers().items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(target.base_url + path)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ hey ... {target.name} c={connections} {seconds}s\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise ClientError(f"{target.name}: hey exited with {done.returncode}: {done.stderr.strip()}")
    return parse_hey(done.stdout)


def parse_hey(text: str) -> LoadRun:
    total = slowest = 0.0
    percentiles: dict[int, float] = {}
    statuses: dict[int, int] = {}
    failures = 0
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith(":") and not line.startswith("["):
            section = line
        if line.startswith("Total:"):
            total = float(line.split()[1])
        elif line.startswith("Slowest:"):
            slowest = float(line.split()[1])
        elif section == "Latency distribution:" and "% in " in line:
            pct, _, value = line.partition("% in ")
            percentiles[int(pct)] = float(value.split()[0])
        elif section == "Status code distribution:" and line.startswith("["):
            code, count = line[1:].split("]", 1)
            statuses[int(code)] = int(count.split()[0])
        elif section == "Error distribution:" and line.startswith("["):
            failures += int(line[1:].split("]", 1)[0])
    if total <= 0 or not percentiles:
        raise ClientError(f"hey printed no summary: {text[-500:]}")
    ok = statuses.get(200, 0)
    return LoadRun(
        requests=ok,
        seconds=total,
        errors={"status": sum(statuses.values()) - ok, "other": failures},
        p50_ms=percentiles.get(50, 0.0) * 1000,
        p90_ms=percentiles.get(90, 0.0) * 1000,
        p99_ms=percentiles.get(99, 0.0) * 1000,
        max_ms=slowest * 1000,
    )


def response_header_counts(target: Target, path: str) -> dict[str, int]:
    """How often each header name occurs in a manifest answer, read off the raw socket (httpx would merge them)."""
    host, _, port = target.base_url.removeprefix("http://").partition(":")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", f"Accept: {MANIFEST_ACCEPT}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in target.headers().items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    counts: dict[str, int] = {}
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        counts[name] = counts.get(name, 0) + 1
    return counts
