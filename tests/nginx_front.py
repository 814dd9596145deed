"""A real nginx, configured from deploy/nginx/registry-gateway.conf, with a test PKI.

``render_site`` turns the shipped site into a test site by a fixed list of substitutions
(ports, certificate paths, log path, domain; the one upstream ``server`` line becomes one line
per test gateway, the way the site's comment adds replicas) and fails if one of them no longer
matches exactly as often as expected, so the tests keep running the file that is shipped, not
a copy that drifts. ``run_nginx`` runs it in the foreground as a child process with its own
prefix, pid, temp and log paths.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import ROOT, free_port

SITE = ROOT / "deploy" / "nginx" / "registry-gateway.conf"
COMPOSE_SITE = ROOT / "deploy" / "container" / "nginx.conf"
TEST_DOMAIN = "gw.test"


@dataclass(frozen=True)
class Pki:
    """A test CA and a server certificate signed by it."""

    ca_cert: Path  # PEM, the trust anchor
    ca_dir: Path  # a directory holding only ca.crt (skopeo's --cert-dir, Docker's certs.d layout)
    cert: Path  # PEM, the server certificate followed by the CA (a "fullchain")
    key: Path  # PEM, the server key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: Path, dns_names: list[str], ip_addresses: list[str]) -> Pki:
    """A CA and a server certificate for ``dns_names`` and ``ip_addresses`` (EC P-256, valid for a day)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("registry-gateway test CA"))
        .issuer_name(_name("registry-gateway test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_pem)
    ca_dir = directory / "ca-dir"
    ca_dir.mkdir(exist_ok=True)
    (ca_dir / "ca.crt").write_bytes(ca_pem)
    cert_path = directory / "fullchain.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    key_path = directory / "privkey.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return Pki(ca_cert=ca_path, ca_dir=ca_dir, cert=cert_path, key=key_path)


def _substitute(text: str, old: str, new: str, count: int, source: Path) -> str:
    found = text.count(old)
    if found != count:
        raise AssertionError(
            f"{source.relative_to(ROOT)}: expected {old!r} {count} time(s), found {found}: "
            "the file changed shape; update tests/nginx_front.py to match"
        )
    return text.replace(old, new)


def upstream_servers(upstream_port: int | Sequence[int]) -> str:
    """The upstream block's server lines for one port or several (one gateway replica each)."""
    ports = [upstream_port] if isinstance(upstream_port, int) else list(upstream_port)
    assert ports, "at least one upstream server"
    return "\n    ".join(f"server 127.0.0.1:{port};" for port in ports)


def render_site(
    source: Path,
    *,
    upstream_port: int | Sequence[int],
    https_port: int,
    http_port: int,
    cert: Path,
    key: Path,
    access_log: Path,
) -> str:
    """The shipped site with only test-specific values changed: loopback ports, the test PKI, the test domain.

    IPv6 listeners are dropped (the test listens on 127.0.0.1 only); every other line is kept.
    ``upstream_port`` may list several ports: one ``server`` line each, in that order.
    """
    text = source.read_text()
    cert_path, key_path = (
        ("/etc/ssl/registry-gateway/fullchain.pem", "/etc/ssl/registry-gateway/privkey.pem")
        if source == SITE
        else ("/etc/nginx/certs/fullchain.pem", "/etc/nginx/certs/privkey.pem")
    )
    text = _substitute(text, "server 127.0.0.1:5000;", upstream_servers(upstream_port), 1, source)
    text = _substitute(text, "listen 80;", f"listen 127.0.0.1:{http_port};", 1, source)
    text = _substitute(text, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;", 1, source)
    text = _substitute(text, f"{cert_path};", f"{cert};", 1, source)
    text = _substitute(text, f"{key_path};", f"{key};", 1, source)
    text = _substitute(text, "access_log /var/log/nginx/access.log ", f"access_log {access_log} ", 2, source)
    text = _substitute(
        text, "server_name example.com *.example.com;", f"server_name {TEST_DOMAIN} *.{TEST_DOMAIN};", 2, source
    )
    text = re.sub(r"(?m)^\s*listen \[::\]:.*\n", "", text)
    return text


def main_config(workdir: Path, site: Path) -> str:
    """An nginx.conf around ``site``: foreground, root workers (the pytest tmp dirs are 0700), private paths."""
    temp = workdir / "temp"
    return f"""\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    include {site};
}}
"""


@dataclass
class Nginx:
    workdir: Path
    https_port: int
    http_port: int
    access_log: Path
    error_log: Path
    proxy_temp: Path
    proc: subprocess.Popen[bytes]

    def access_lines(self) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else []


def write_config(workdir: Path, source: Path, *, upstream_port: int | Sequence[int], pki: Pki) -> tuple[Path, int, int]:
    """Write site.conf and nginx.conf into ``workdir``; returns (nginx.conf, https port, http port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "temp" / sub).mkdir(parents=True, exist_ok=True)
    https_port, http_port = free_port(), free_port()
    site = workdir / "site.conf"
    site.write_text(
        render_site(
            source,
            upstream_port=upstream_port,
            https_port=https_port,
            http_port=http_port,
            cert=pki.cert,
            key=pki.key,
            access_log=workdir / "access.log",
        )
    )
    conf = workdir / "nginx.conf"
    conf.write_text(main_config(workdir, site))
    return conf, https_port, http_port


def check_config(workdir: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``conf``."""
    return subprocess.run(
        ["nginx", "-t", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], error_log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{error_log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx did not listen on {port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def run_nginx(workdir: Path, *, upstream_port: int | Sequence[int], pki: Pki, source: Path = SITE) -> Iterator[Nginx]:
    """nginx in the foreground with ``source`` rendered for the test, until the block ends."""
    conf, https_port, http_port = write_config(workdir, source, upstream_port=upstream_port, pki=pki)
    error_log = workdir / "error.log"
    with (workdir / "nginx.out").open("wb") as out:
        proc = subprocess.Popen(
            ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(error_log)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(https_port, proc, error_log)
        yield Nginx(
            workdir=workdir,
            https_port=https_port,
            http_port=http_port,
            access_log=workdir / "access.log",
            error_log=error_log,
            proxy_temp=workdir / "temp" / "proxy",
            proc=proc,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
