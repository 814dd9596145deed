"""Real clients for end-to-end tests: skopeo, containerd (ctr), dockerd, podman.

Host routing needs names such as ``ghcr.gw.test`` to reach 127.0.0.1. Rather than
editing the machine's /etc/hosts, each client runs in a private mount namespace
(``unshare -m``) with a test hosts file bind-mounted over /etc/hosts: nothing
outside the test sees the change, and it needs no DNS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.testbed.images import Image

GATEWAY_HOSTS = [
    "gw.test",
    "ghcr.gw.test",
    "quay.gw.test",
    "docker.gw.test",
    "anon.gw.test",
    "pass.gw.test",
    "login.gw.test",
]
# A closed loopback port: containerd's and podman's fallback "server" and dockerd's proxy,
# so that no client can ever reach the internet behind the gateway's back.
CLOSED = "127.0.0.1:9"


def write_hosts_file(path: Path) -> Path:
    path.write_text("127.0.0.1 localhost\n::1 localhost\n127.0.0.1 " + " ".join(GATEWAY_HOSTS) + "\n")
    return path


def in_namespace(argv: list[str], hosts_file: Path) -> list[str]:
    """``argv`` wrapped to run with ``hosts_file`` as its /etc/hosts."""
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts_file), *argv]


def run(
    argv: list[str], *, timeout: float = 300, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, input=stdin
    )
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Skopeo:
    workdir: Path
    hosts_file: Path

    def __post_init__(self) -> None:
        self.policy = self.workdir / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        # skopeo keeps a blob-info cache under /var/lib/containers unless told otherwise.
        self.cache = self.workdir / "blob-info-cache"

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = ["skopeo", "--policy", str(self.policy), *args]
        return run(in_namespace(argv, self.hosts_file), timeout=timeout)

    def copy_all(self, source: str, dest: Path, *extra: str) -> Path:
        """``skopeo copy --all docker://source dir:dest`` over plain HTTP."""
        if dest.exists():
            shutil.rmtree(dest)
        self("copy", "--all", "--src-tls-verify=false", *extra, f"docker://{source}", f"dir:{dest}")
        return dest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_dir_copy(dest: Path, image: Image) -> None:
    """Every byte skopeo stored equals what was pushed: manifests and blobs, by digest."""
    top = (dest / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(top).hexdigest() == image.digest
    manifests = {"sha256:" + hashlib.sha256(top).hexdigest()}
    blobs: set[str] = set()
    for path in dest.iterdir():
        if path.name.endswith(".manifest.json"):
            digest = "sha256:" + path.name.removesuffix(".manifest.json")
            assert "sha256:" + sha256_file(path) == digest
            manifests.add(digest)
        elif len(path.name) == 64:
            digest = "sha256:" + path.name
            assert "sha256:" + sha256_file(path) == digest, f"blob {digest} is corrupt"
            assert path.stat().st_size == image.blobs[digest]
            blobs.add(digest)
    assert manifests == set(image.manifests)
    assert blobs == set(image.blobs)


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear; log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


@dataclass
class Containerd:
    root: Path
    socket: Path

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "--address", str(self.socket), "--namespace", "e2e", *args], timeout=timeout)

    def hosts_dir(self, mirrors: dict[str, str]) -> Path:
        """A ``--hosts-dir`` whose ``<registry>/hosts.toml`` points at a gateway mirror URL.

        A mirror URL with a path (``http://gw/v2/quay.io``) uses ``override_path``, as
        containerd's docs/hosts.md describes for mirrors under a path.
        """
        directory = self.root / f"hosts-{abs(hash(tuple(sorted(mirrors.items()))))}"
        for registry, url in mirrors.items():
            (directory / registry).mkdir(parents=True, exist_ok=True)
            override = "\n  override_path = true" if "/v2/" in url else ""
            (directory / registry / "hosts.toml").write_text(
                f'server = "http://{CLOSED}"\n\n[host."{url}"]\n  capabilities = ["pull", "resolve"]{override}\n'
            )
        return directory

    def pull(self, ref: str, hosts_dir: Path, *extra: str) -> None:
        self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), *extra, ref)

    def image_digest(self, ref: str) -> str:
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise AssertionError(f"{ref} not in ctr images ls")

    def remove_all(self) -> None:
        refs = self.ctr("images", "ls", "-q").stdout.split()
        if refs:
            self.ctr("images", "rm", "--sync", *refs)
        self.ctr("content", "prune", "references")


@contextlib.contextmanager
def start_containerd(root: Path) -> Iterator[Containerd]:
    root.mkdir(parents=True, exist_ok=True)
    socket = root / "containerd.sock"
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root}/root"\nstate = "{root}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n[ttrpc]\n  address = "{socket}.ttrpc"\n'
    )
    log = root / "containerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_socket(socket, proc, log)
        yield Containerd(root=root, socket=socket)
    finally:
        _terminate(proc)
        subprocess.run(["umount", "-R", f"{root}/root"], capture_output=True)


@dataclass
class Dockerd:
    root: Path
    socket: Path

    def docker(self, *args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # The CLI's own config (logins) stays in the test's directory, not in ~/.docker, and the
        # CLI sees no credential helper of the machine's: it picks docker-credential-pass by
        # itself when one is on PATH (docker/cli credentials.DetectDefaultStore), and logins
        # would then go to the machine's password store instead of the test's config file.
        no_helpers = self.root / "cli-path"
        no_helpers.mkdir(exist_ok=True)
        env = {**os.environ, "DOCKER_CONFIG": str(self.root / "cli-config"), "PATH": str(no_helpers)}
        docker = shutil.which("docker")
        assert docker is not None, "the docker CLI is not installed (scripts/install installs docker.io)"
        argv = [docker, "-H", f"unix://{self.socket}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=stdin)
        if proc.returncode != 0:
            raise AssertionError(f"docker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def repo_digests(self, ref: str) -> list[str]:
        out = self.docker("image", "inspect", ref, "--format", "{{json .RepoDigests}}").stdout
        return list(json.loads(out))


@contextlib.contextmanager
def start_dockerd(root: Path, hosts_file: Path, daemon_config: Mapping[str, object]) -> Iterator[Dockerd]:
    """dockerd with its own data-root and exec-root, no bridge, no iptables, in a hosts namespace.

    HTTP(S)_PROXY point at a closed port: dockerd falls back to Docker Hub when a
    mirror fails, and that fallback must never leave the machine.
    """
    root.mkdir(parents=True, exist_ok=True)
    socket = root / "docker.sock"
    config = root / "daemon.json"
    config.write_text(
        json.dumps(
            {"bridge": "none", "iptables": False, "ip6tables": False, "storage-driver": "overlay2", **daemon_config}
        )
    )
    env = {
        **os.environ,
        "HTTP_PROXY": f"http://{CLOSED}",
        "HTTPS_PROXY": f"http://{CLOSED}",
        "NO_PROXY": ",".join(GATEWAY_HOSTS),
    }
    log = root / "dockerd.log"
    argv = [
        "dockerd",
        "--config-file",
        str(config),
        "--data-root",
        str(root / "data"),
        "--exec-root",
        str(root / "exec"),
        "--pidfile",
        str(root / "docker.pid"),
        "-H",
        f"unix://{socket}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(in_namespace(argv, hosts_file), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_socket(socket, proc, log)
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "-H", f"unix://{socket}", "info"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not become ready; log:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield Dockerd(root=root, socket=socket)
    finally:
        _terminate(proc, timeout=30)
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)


@dataclass
class Podman:
    root: Path
    hosts_file: Path

    def __call__(
        self, *args: str, registries_conf: Path, timeout: float = 300, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        storage = self.root / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "overlay"\nrunroot = "{self.root}/run"\ngraphroot = "{self.root}/graph"\n'
        )
        argv = ["podman", "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]
        env = {"CONTAINERS_REGISTRIES_CONF": str(registries_conf), "CONTAINERS_STORAGE_CONF": str(storage)}
        return run(in_namespace(argv, self.hosts_file), timeout=timeout, env=env, stdin=stdin)

    def digest(self, ref: str, registries_conf: Path) -> str:
        out = self("image", "inspect", ref, "--format", "{{.Digest}}", registries_conf=registries_conf).stdout
        return out.strip()
