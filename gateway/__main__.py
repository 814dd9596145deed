"""``registry-gateway`` / ``python -m gateway``: read settings, check routes, run uvicorn."""

from __future__ import annotations

import argparse
import os
import shutil
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
    )
    parser.add_argument("--routes", type=Path, help="the routing table (default: ./routes.toml)")
    parser.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 5000)")
    parser.add_argument("--workers", type=int, help="worker processes (default: 1)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--version", action="version", version=f"registry-gateway {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # Command-line options become environment variables so that every uvicorn worker
    # process, which builds its own app from the environment, sees the same settings.
    for name in ("routes", "host", "port", "workers", "log_level"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"GATEWAY_{name.upper()}"] = str(value)

    from gateway.app import check_settings
    from gateway.errors import ConfigError
    from gateway.log import configure_logging
    from gateway.routes_file import load_routes
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

    configure_logging(settings.log_level)
    import uvicorn

    metrics_dir = _multiprocess_metrics_dir(settings.workers)

    from gateway.log import logger

    logger.info(
        "starting",
        extra={
            "fields": {
                "event": "start",
                "version": __version__,
                "routes": [r.name for r in table.routes],
                "listen": f"{settings.host}:{settings.port}",
                "workers": settings.workers,
            }
        },
    )
    try:
        uvicorn.run(
            "gateway.app:worker_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            server_header=False,
            # X-Forwarded-* are handled by the app (gateway/forwarded.py), Host included.
            proxy_headers=False,
            # Longer than the usual 60 s idle timeout of nginx and load balancers, so that the
            # proxy, not the gateway, closes idle keep-alive connections (no races on reuse).
            timeout_keep_alive=75,
            # On SIGTERM: stop accepting, let in-flight pulls finish for this long.
            timeout_graceful_shutdown=int(settings.shutdown_timeout),
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


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
