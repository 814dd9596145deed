"""Process settings: pydantic-settings, every field also a ``GATEWAY_*`` environment variable.

Routing data lives in routes.toml (``routes``); this holds how the process runs:
where it listens, and how patient it is with upstreams. The defaults suit
multi-GB layers over slow links: the read timeout is the longest *silence*
allowed between two reads, not a limit on a whole transfer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.upstream import PoolLimits, Timeouts


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    routes: Path = Path("routes.toml")
    host: str = "0.0.0.0"
    port: int = Field(default=5000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # Behind a reverse proxy: peers whose X-Forwarded-* headers are believed (comma-separated
    # IPs or CIDRs, or "*"). Anyone else's forwarding headers are ignored.
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # On SIGTERM: stop accepting, let in-flight pulls finish for up to this many seconds.
    shutdown_timeout: float = Field(default=300.0, ge=0)

    # Upstream patience, in seconds.
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=300.0, gt=0)
    write_timeout: float = Field(default=60.0, gt=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    token_timeout: float = Field(default=30.0, gt=0)
    max_redirects: int = Field(default=5, ge=0, le=20)

    # Upstream connection pool, per route.
    max_connections: int = Field(default=512, ge=1)
    max_keepalive_connections: int = Field(default=128, ge=0)
    keepalive_expiry: float = Field(default=60.0, ge=0)

    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.pool_timeout,
            token=self.token_timeout,
        )

    def pool_limits(self) -> PoolLimits:
        return PoolLimits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_keepalive_connections,
            keepalive_expiry=self.keepalive_expiry,
        )
