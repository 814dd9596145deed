"""``registry-gateway`` / ``python -m gateway``: read settings, check routes, run uvicorn."""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from gateway import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-gateway",
        description="A streaming pull-through gateway for container registries. "
        "Every option can also be set as a GATEWAY_* environment variable (GATEWAY_ROUTES, GATEWAY_PORT, ...).",
        epilog="registry-gateway check [IMAGE] [--json]: check the configuration against every upstream "
        "(or say where IMAGE would be pulled from) and exit; registry-gateway check --help for more.",
    )
    parser.add_argument("--routes", type=Path, help="the routing table (default: ./routes.toml)")
    parser.add_argument(
        "--host",
        action="append",
        help="address to listen on; repeat it or give a comma-separated list for several "
        "(default: '::', IPv6 and IPv4 clients on one socket; 0.0.0.0 where IPv6 is off)",
    )
    parser.add_argument("--port", type=int, help="port to listen on (default: 5000)")
    parser.add_argument("--workers", type=int, help="worker processes (default: 1)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--version", action="version", version=f"registry-gateway {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:  # `registry-gateway check [IMAGE]`: gateway/check.py
        from gateway import check

        sys.exit(check.main(argv[1:]))
    args = _parser().parse_args(argv)
    # Command-line options become environment variables so that every uvicorn worker
    # process, which builds its own app from the environment, sees the same settings.
    for name in ("routes", "host", "port", "workers", "log_level"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"GATEWAY_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)

    from gateway.app import check_settings
    from gateway.http.errors import ConfigError
    from gateway.observe.log import configure_logging
    from gateway.routing.routes_file import load_routes
    from gateway.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        key = "GATEWAY_" + "_".join(str(p) for p in first["loc"]).upper()
        sys.exit(f"registry-gateway: error: {key}: {first['msg']}")
    try:
        table = load_routes(settings.routes)
        check_settings(settings, table)
    except ConfigError as exc:
        sys.exit(f"registry-gateway: error: {exc}")

    from gateway import sizing

    try:
        memory = sizing.budget(settings.shared_memory_bytes, settings.workers, sizing.container_limit())
    except sizing.DoesNotFit as exc:
        sys.exit(f"registry-gateway: error: {exc}")
    configure_logging(settings.log_level)
    if settings.token_secret is None and settings.workers > 1:
        # One secret for every worker, so that a grant one signs another accepts (grants.py).
        os.environ["GATEWAY_TOKEN_SECRET"] = secrets.token_hex(32)
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    # Bound here, before the workers exist, so that a taken port is one line on stderr and
    # every worker accepts on the same sockets.
    sockets = _listen(settings.host.split(","), settings.port, fallback="host" not in settings.model_fields_set)
    metrics_dir = _multiprocess_metrics_dir(settings.workers)

    from gateway.observe.log import logger

    logger.info(
        "starting",
        extra={
            "fields": {
                "event": "start",
                "version": __version__,
                "routes": [r.name for r in table.routes],
                "listen": [_address_text(s) for s in sockets],
                "workers": settings.workers,
                "shared_memory_bytes": memory.per_worker,
                "shared_memory_from": memory.source,
                "memory_limit": memory.limit,
            }
        },
    )
    config = uvicorn.Config(
        "gateway.app:worker_app",
        factory=True,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        server_header=False,
        # X-Forwarded-* are handled by the app (gateway/http/forwarded.py), Host included.
        proxy_headers=False,
        # Longer than the usual 60 s idle timeout of nginx and load balancers, so that the
        # proxy, not the gateway, closes idle keep-alive connections (no races on reuse).
        timeout_keep_alive=75,
        # On SIGTERM: stop accepting, let in-flight pulls finish for this long.
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
    )
    try:
        # What uvicorn.run does, with our sockets: it takes only a host (one socket, and a
        # V6ONLY one for "::" when it binds in the worker) or a single fd.
        if settings.workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            server = uvicorn.Server(config)
            server.run(sockets=sockets)
            if not server.started:
                sys.exit(3)  # uvicorn's STARTUP_FAILURE
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


# errno values that mean "no IPv6 here" (a kernel without it), not "port taken".
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT, socket.EAI_FAMILY}


def _listen(hosts: list[str], port: int, *, fallback: bool) -> list[socket.socket]:
    """One listening socket per address of each host; exits with one line if one cannot be had.

    "::" is dual-stack (IPV6_V6ONLY=0, RFC 3493 5.3): IPv4 clients arrive as ::ffff:a.b.c.d,
    which the app reads as a.b.c.d (forwarded.py). It is V6ONLY, as every other IPv6 address
    is, when an IPv4 address is listed too, so that "--host :: --host 127.0.0.1" means what
    it says instead of colliding. Listening here, not in the workers, makes a taken port
    this process's error. ``fallback`` (the default host): where IPv6 is off, 0.0.0.0.
    """
    try:
        infos = [
            (host, info)
            for host in hosts
            for info in dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
        ]
    except socket.gaierror as exc:
        if fallback and exc.errno in _NO_IPV6:
            return _listen(["0.0.0.0"], port, fallback=False)
        sys.exit(f"registry-gateway: error: cannot listen on {','.join(hosts)}: {exc.strerror}")
    ipv4_listed = any(info[0] == socket.AF_INET for _, info in infos)
    sockets: list[socket.socket] = []
    for host, (family, kind, proto, _, address) in infos:
        where = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            if fallback and exc.errno in _NO_IPV6:
                return _listen(["0.0.0.0"], port, fallback=False)
            sys.exit(f"registry-gateway: error: cannot listen on {where}:{port}: {exc.strerror}")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                v6only = host != "::" or ipv4_listed
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            sock.bind((address[0], port, *address[2:]))  # an IPv6 scope id kept
            sock.listen(2048)  # uvicorn's backlog
        except OSError as exc:
            sock.close()
            if fallback and family == socket.AF_INET6 and exc.errno in _NO_IPV6:
                return _listen(["0.0.0.0"], port, fallback=False)  # IPv6 switched off in this namespace
            sys.exit(f"registry-gateway: error: cannot listen on {where}:{port}: {exc.strerror}")
        sock.set_inheritable(True)  # handed to the workers (uvicorn's Multiprocess)
        port = port or sock.getsockname()[1]  # --port 0: one port for every address
        sockets.append(sock)
    return sockets


def _address_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _multiprocess_metrics_dir(workers: int) -> str | None:
    """Prepare prometheus-client's multiprocess directory; returns one to delete at exit.

    Workers are started afresh by uvicorn and inherit the variable, so /metrics in any
    worker reports the sum over all of them.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        # Values left by an earlier run would be added to this run's (prometheus-client docs).
        for stale in Path(configured).glob("*.db"):
            stale.unlink(missing_ok=True)
        return None
    if workers <= 1:
        return None
    directory = tempfile.mkdtemp(prefix="registry-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


if __name__ == "__main__":
    main()
