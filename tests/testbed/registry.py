"""distribution 2.8 (Debian's ``docker-registry``) subprocesses."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import httpx

from ._util import LOOPBACK, ManagedProcess, TestbedError, free_port, wait_until

REGISTRY_BINARY = "docker-registry"


def _yaml(value: object, indent: int = 0) -> str:
    """Tiny YAML emitter for nested dicts/lists of scalars (JSON scalars are valid YAML)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines.append(_yaml(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                first, *rest = _yaml(item, indent + 1).splitlines()
                lines.append(f"{pad}- {first.lstrip()}")
                lines.extend(rest)
            else:
                lines.append(f"{pad}- {json.dumps(item)}")
    else:
        lines.append(f"{pad}{json.dumps(value)}")
    return "\n".join(lines)


class Registry:
    """One ``docker-registry serve`` process with filesystem storage and token auth."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        realm: str,
        service: str,
        issuer: str,
        rootcertbundle: Path,
        redirect_baseurl: str | None = None,
    ) -> None:
        self.name = name
        self.dir = workdir / f"registry-{name}"
        self.storage_dir = self.dir / "storage"
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.realm = realm
        self.service = service
        self.port = 0
        self.redirect_baseurl = redirect_baseurl
        self.issuer = issuer
        self.rootcertbundle = rootcertbundle
        self._proc: ManagedProcess | None = None

    @property
    def host_port(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def config(self) -> dict[str, object]:
        storage: dict[str, object] = {
            "filesystem": {"rootdirectory": str(self.storage_dir)},
            "delete": {"enabled": False},
            "maintenance": {"uploadpurging": {"enabled": False}, "readonly": {"enabled": False}},
            "redirect": {"disable": False},
            "cache": {"blobdescriptor": "inmemory"},
        }
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": storage,
            "http": {
                "addr": self.host_port,
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.rootcertbundle),
                }
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.redirect_baseurl is not None:
            config["middleware"] = {"storage": [{"name": "redirect", "options": {"baseurl": self.redirect_baseurl}}]}
        return config

    def start(self, timeout: float = 20.0) -> None:
        if shutil.which(REGISTRY_BINARY) is None:
            raise TestbedError(f"{REGISTRY_BINARY} not found (apt-get install docker-registry)")
        for _attempt in range(3):
            self.port = free_port()
            self.config_path.write_text(_yaml(self.config()) + "\n")
            self._proc = ManagedProcess(
                f"registry-{self.name}",
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                log_path=self.log_path,
                cwd=self.dir,
            )
            proc = self._proc

            def ready(proc: ManagedProcess = proc) -> bool:
                proc.check_alive()
                return httpx.get(self.url + "/v2/", timeout=2).status_code == 401

            try:
                wait_until(ready, timeout=timeout, what=f"registry {self.name} on {self.url}")
            except TestbedError:
                proc.stop()
                self._proc = None
                if "address already in use" not in (self.log_path.read_text(errors="replace")):
                    raise
            else:
                return
        raise TestbedError(f"registry {self.name} could not bind a port")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
