"""``registry-gateway`` / ``python -m gateway``: read settings, check routes, run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
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

    from gateway.log import configure_logging
    from gateway.routes import ConfigError, load_routes
    from gateway.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        key = "GATEWAY_" + "_".join(str(p) for p in first["loc"]).upper()
        sys.exit(f"registry-gateway: error: {key}: {first['msg']}")
    try:
        table = load_routes(settings.routes)
    except ConfigError as exc:
        sys.exit(f"registry-gateway: error: {exc}")

    configure_logging(settings.log_level)
    import uvicorn

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
    uvicorn.run(
        "gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
