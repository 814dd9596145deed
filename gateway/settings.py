"""Process settings: pydantic-settings, every field also a ``GATEWAY_*`` environment variable.

Routing data lives in routes.toml (``routes``); this holds how the process runs:
where it listens, and how patient it is with upstreams. The defaults suit
multi-GB layers over slow links: the read timeout is the longest *silence*
allowed between two reads, not a limit on a whole transfer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.routing.budget import parse_thresholds


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream patience, in seconds (the Settings fields of the same names say what each bounds)."""

    connect: float
    token: float
    manifest: float
    blob_idle: float
    write: float
    pool: float
    # A docker credential helper's whole run (``credential_helper.py``).
    credential_helper: float = 10.0

    def per_request(self) -> dict[str, float]:
        """httpx's per-request timeout extension: connect, read, write and pool.

        httpx's read timeout is per read: exactly the blob idle timeout. Whole-answer
        deadlines (token, manifest) are enforced around the calls with asyncio.timeout.
        """
        return {"connect": self.connect, "read": self.blob_idle, "write": self.write, "pool": self.pool}


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """One route's upstream connection pool."""

    max_connections: int
    max_keepalive_connections: int
    keepalive_expiry: float


class Settings(BaseSettings):
    # forbid: a misspelt keyword (Settings(manifest_cache_byte=0) in a test) is an error, not
    # silently ignored. Unknown GATEWAY_* variables are not fields and stay ignored.
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    routes: Path = Path("routes.toml")
    # Where to listen: addresses or names, comma-separated, one socket each. "::" takes IPv6
    # and IPv4 clients on one socket; by default it falls back to 0.0.0.0 where IPv6 is off.
    host: str = "::"
    port: int = Field(default=5000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # Behind a reverse proxy: peers whose X-Forwarded-* headers are believed (comma-separated
    # IPs or CIDRs, or "*"). Anyone else's forwarding headers are ignored.
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # On SIGTERM: stop accepting, let in-flight pulls finish for up to this many seconds.
    shutdown_timeout: float = Field(default=300.0, ge=0)

    # Upstream patience, in seconds.
    connect_timeout: float = Field(default=10.0, gt=0)  # to open one connection
    token_timeout: float = Field(default=30.0, gt=0)  # a whole token request
    # A whole manifest, tags or referrers answer; for blobs, the time until the headers.
    manifest_timeout: float = Field(default=60.0, gt=0)
    # The longest silence while a blob streams; not a limit on the whole transfer.
    blob_idle_timeout: float = Field(default=300.0, gt=0)
    write_timeout: float = Field(default=60.0, gt=0)
    pool_timeout: float = Field(default=30.0, gt=0)
    # A credential helper's whole run (docker-credential-<helper> get), killed past it.
    credential_helper_timeout: float = Field(default=10.0, gt=0)
    max_redirects: int = Field(default=5, ge=0, le=20)
    # A blob body that breaks (reset, early end, stall past blob_idle_timeout, an expired CDN
    # URL) is asked for again from where it broke, at most this many times per request in all
    # (resume.py): enough for every source of a route with two upstreams and a mirror to fail twice.
    blob_resumes: int = Field(default=5, ge=0, le=100)
    # How many times more the upstream (or mirror) whose body broke is asked for the rest before
    # it is passed over for that blob and the next source of the route is asked (resume.Breaks).
    blob_resume_same_upstream: int = Field(default=1, ge=0, le=100)
    # Shared blob fetches (herd.py): concurrent GETs of one blob read one upstream body. The
    # window is how far the slowest of them may fall behind the fastest before it goes on
    # alone; 128 MiB is about one second of a 1 Gbit/s link and 1/16 s of 2 GB/s. 0 turns
    # sharing off. The memory cap bounds all windows together: new fetches past it are
    # relayed alone.
    # Signs the gateway's own tokens on hosts several routes share when one of them passes logins
    # through (grants.py). Every worker and replica must have the same; unset, the server makes
    # one at start for its workers (a token from one replica is then refused by another).
    token_secret: SecretStr | None = None

    shared_window_bytes: int = Field(default=128 << 20, ge=0)
    # Unset: sized from the container's memory limit (sizing.py), 512 MiB where there is none.
    shared_memory_bytes: int | None = Field(default=None, ge=0)
    # /status shows client addresses (of recent errors, and Docker Hub's ratelimit source) only if set.
    status_show_clients: bool = False
    # Bytes every reader of a shared fetch has had, kept behind the slowest (a younger fetch that
    # catches up merges into them). A fetch's first bytes are kept apart from these (herd.HEAD).
    shared_retain_bytes: int = Field(default=8 << 20, ge=0)
    # How long in all a shared fetch's clients may wait for latecomers: while it holds its first
    # window for clients that keep coming, and while younger fetches catch up with it. The price
    # of one upstream fetch for a rollout that starts its nodes over seconds; 0: nobody waits.
    shared_patience_seconds: float = Field(default=15.0, ge=0, le=300)

    # A route's upstream that fails this many times in a row (connection error, timeout,
    # 5xx) is skipped for breaker_cooldown seconds, then tried again.
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown: float = Field(default=30.0, ge=0)

    # Who may use the gateway (off unless set): an htpasswd file (bcrypt entries) and/or a
    # file of static bearer tokens, one per line.
    htpasswd: Path | None = None
    auth_tokens_file: Path | None = None
    # Requests per second per client IP (0: no limit), and the burst allowed above it.
    rate_limit: float = Field(default=0.0, ge=0)
    rate_burst: int = Field(default=200, ge=1)

    # Manifest answers kept in memory (bytes; 0 turns the cache off), and for how long:
    # answers by tag (a push is seen within this time; 0: never cached) and by digest.
    manifest_cache_bytes: int = Field(default=64 << 20, ge=0)
    manifest_cache_tag_ttl: float = Field(default=30.0, ge=0)
    manifest_cache_digest_ttl: float = Field(default=3600.0, ge=0)
    # How long past its lifetime a manifest answer is still served when the upstream answers
    # 429 or 5xx, or cannot be reached (marked Warning: 110); 0: never served stale.
    manifest_stale_if_error: float = Field(default=86400.0, ge=0)

    # Warn when an upstream's remaining pull budget falls to these fractions of its limit
    # (Docker Hub's ratelimit-remaining; once per crossing). Empty: no warnings.
    budget_warn_at: str = "0.5,0.2,0.05"

    # How upstream connections are made: "lean" (gateway/net/transport.py, built for streaming)
    # or "httpx" (httpx's own httpcore transport). Both keep the same behaviour.
    upstream_transport: Literal["lean", "httpx"] = "lean"

    # Upstream connection pool, per route.
    max_connections: int = Field(default=512, ge=1)
    max_keepalive_connections: int = Field(default=128, ge=0)
    keepalive_expiry: float = Field(default=60.0, ge=0)

    @field_validator("host")
    @classmethod
    def _host_list(cls, value: str) -> str:
        hosts = [h.strip().removeprefix("[").removesuffix("]") for h in value.split(",")]
        if not all(hosts):
            raise ValueError("an empty address in the list")
        return ",".join(dict.fromkeys(hosts))

    @field_validator("budget_warn_at")
    @classmethod
    def _fractions(cls, value: str) -> str:
        parse_thresholds(value)  # ValueError: not fractions in (0, 1]
        return value

    def budget_thresholds(self) -> tuple[float, ...]:
        return parse_thresholds(self.budget_warn_at)

    @property
    def client_auth_enabled(self) -> bool:
        return self.htpasswd is not None or self.auth_tokens_file is not None

    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout,
            token=self.token_timeout,
            manifest=self.manifest_timeout,
            blob_idle=self.blob_idle_timeout,
            write=self.write_timeout,
            pool=self.pool_timeout,
            credential_helper=self.credential_helper_timeout,
        )

    def pool_limits(self) -> PoolLimits:
        return PoolLimits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_keepalive_connections,
            keepalive_expiry=self.keepalive_expiry,
        )
