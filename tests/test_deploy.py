"""The deployment files under deploy/: everything that can be checked without a cluster or an image build.

- Kubernetes: the plain manifests, deploy/kubernetes/namespace.yaml and registry-gateway.yaml (the
  Helm chart's output, committed; tests/test_helm.py renders and checks the chart itself and fails
  when the two drift). Every object is validated offline against the Kubernetes JSON schemas
  (kubernetes-validate, strict: unknown fields fail), oldest and newest. Then the properties that
  matter: security context, probes, shutdown budget, wiring between objects, the routes ConfigMap.
- Containerfile: parsed; base tags, user, HEALTHCHECK, EXPOSE, routes; the HEALTHCHECK command
  itself runs against a real gateway started with the Deployment's settings.
- compose.yaml: parsed, every referenced file exists, ``docker-compose config`` accepts it.
- nginx: both sites pass ``nginx -t``, carry the streaming directives, and differ only as
  documented.
- systemd: ``systemd-analyze verify`` and ``security --offline``, plus the shutdown budget.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.routing.routes_file import parse_routes
from gateway.settings import Settings
from tests.nginx_front import COMPOSE_SITE, SITE, check_config, make_pki, write_config
from tests.support import ROOT, free_port, run_gateway

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
COMPOSE = DEPLOY / "container" / "compose.yaml"
UNIT = DEPLOY / "systemd" / "registry-gateway.service"

Obj = dict[str, Any]


def gateway_setting_name(variable: str) -> str | None:
    """``GATEWAY_SHUTDOWN_TIMEOUT`` -> ``shutdown_timeout`` when that is a real setting."""
    if not variable.startswith("GATEWAY_"):
        return None
    return variable.removeprefix("GATEWAY_").lower()


def assert_valid_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Every GATEWAY_* variable names a real setting (the gateway ignores unknown ones) and parses."""
    for name in env:
        field = gateway_setting_name(name)
        if field is not None:
            assert field in Settings.model_fields, f"{name} is not a gateway setting"
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def seconds(text: str | int | float) -> float:
    """A duration as systemd, compose and nginx write it: 330, "330s", "5m30s", "900s"."""
    if isinstance(text, int | float):
        return float(text)
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|min|)", text.strip()):
        total += float(number) * {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600}[unit]
    return total


# --- the plain manifests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    """deploy/kubernetes as ``kubectl apply -f`` reads it: the namespace, then the chart's committed output."""
    objects: list[Obj] = []
    for path in (KUBE / "namespace.yaml", KUBE / "registry-gateway.yaml"):
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def only(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def test_base_has_the_expected_objects(base):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base)
    assert kinds == sorted(
        [
            ("Namespace", "registry-gateway"),
            ("ConfigMap", "registry-gateway-routes"),
            ("Deployment", "registry-gateway"),
            ("Service", "registry-gateway"),
            ("Ingress", "registry-gateway"),
            ("HorizontalPodAutoscaler", "registry-gateway"),
            ("PodDisruptionBudget", "registry-gateway"),
        ]
    )
    for obj in base:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "registry-gateway", obj["kind"]
            assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "registry-gateway"


# --- schemas ------------------------------------------------------------------------------------


def schema_versions() -> list[str]:
    """The oldest Kubernetes minor still commonly run that the package has schemas for, and the newest."""
    versions = sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    oldest = next((v for v in versions if tuple(map(int, v.split(".")))[:2] >= (1, 29)), versions[0])
    return sorted({oldest, versions[-1]})


@pytest.mark.parametrize("version", schema_versions())
def test_objects_match_the_kubernetes_schemas(base, version):
    for obj in base:
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_is_not_vacuous(base):
    """The same validation rejects a misspelt field and a wrong type."""
    version = schema_versions()[-1]
    deployment = json.loads(json.dumps(only(base, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    hpa = json.loads(json.dumps(only(base, "HorizontalPodAutoscaler")))
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, version, strict=True)


# --- the properties that matter -------------------------------------------------------------------


def pod_spec(objects: list[Obj]) -> Obj:
    return only(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: list[Obj]) -> Obj:
    (c,) = pod_spec(objects)["containers"]
    return c


def env_of(objects: list[Obj]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects).get("env", []) if "value" in e}


def test_pod_security(base):
    """The pod meets the "restricted" Pod Security Standard its namespace enforces, and more."""
    namespace = only(base, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    spec = pod_spec(base)
    pod_ctx = spec["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["runAsUser"] != 0
    assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(field)
    allowed_volumes = {"configMap", "secret", "emptyDir", "projected", "downwardAPI", "persistentVolumeClaim"}
    for volume in spec["volumes"]:
        assert set(volume) - {"name"} <= allowed_volumes, volume
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["runAsNonRoot"] is True
        assert ctx.get("privileged", False) is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert not ctx["capabilities"].get("add")
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any(p.get("hostPort") for p in c.get("ports", []))


def test_writable_paths_are_volumes(base):
    """With a read-only root, /tmp must be an emptyDir; one worker needs no metrics directory of its own."""
    spec = pod_spec(base)
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m for m in container(base)["volumeMounts"]}
    assert mounts["/tmp"]["name"] in empty_dirs
    assert env_of(base)["GATEWAY_WORKERS"] == "1"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_of(base)
    # A memory-backed emptyDir would count against the memory limit.
    assert not any(v["emptyDir"].get("medium") == "Memory" for v in spec["volumes"] if "emptyDir" in v)
    for path, mount in mounts.items():
        if mount["name"] not in empty_dirs:
            assert mount.get("readOnly") is True, path


def test_probes(base):
    c = container(base)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    settings_port = int(env_of(base)["GATEWAY_PORT"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert port_names[c[probe]["httpGet"]["port"]] == settings_port == 5000


def test_shutdown_budget(base):
    """preStop sleep, then SIGTERM and the gateway's drain; the kubelet's SIGKILL only after both."""
    spec = pod_spec(base)
    command = container(base)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5  # long enough for endpoints and ingress-nginx to drop the pod
    shutdown = float(env_of(base)["GATEWAY_SHUTDOWN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > shutdown + pre_stop


def test_resources_replicas_and_image(base):
    deployment = only(base, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA's
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    c = container(base)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    image = c["image"]
    assert re.fullmatch(r"[a-z0-9.\-/:]+:[0-9][\w.\-]*", image), image  # a version tag, never latest
    assert c["imagePullPolicy"] == "IfNotPresent"


def test_objects_are_wired_together(base):
    deployment = only(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = only(base, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(base)["ports"]}
    pdb = only(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = only(base, "HorizontalPodAutoscaler")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "registry-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # The pod mounts the ConfigMap and Secret that are actually rendered.
    volumes = {v["name"]: v for v in pod_spec(base)["volumes"]}
    assert volumes["routes"]["configMap"]["name"] == only(base, "ConfigMap")["metadata"]["name"]
    # No Secret is rendered (no credentials in git): the pod mounts one made out of band, if any.
    assert volumes["credentials"]["secret"]["secretName"] == "registry-gateway-credentials"
    assert volumes["credentials"]["secret"]["optional"] is True
    mounts = {m["name"]: m["mountPath"] for m in container(base)["volumeMounts"]}
    args = container(base)["args"]
    routes_path = args[args.index("--routes") + 1]
    assert routes_path == f"{mounts['routes']}/routes.toml"


def nginx_directives(path: Path) -> dict[str, list[str]]:
    """Directive name -> argument strings of every occurrence (comments dropped; good enough for a flat site)."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    found: dict[str, list[str]] = {}
    for statement in re.findall(r"([a-z_0-9]+)((?:\s+[^;{}]+)?)\s*;", text):
        found.setdefault(statement[0], []).append(" ".join(statement[1].split()))
    return found


def test_ingress(base):
    ingress = only(base, "Ingress")
    service = only(base, "Service")
    hosts = [rule["host"] for rule in ingress["spec"]["rules"]]
    assert hosts == ["example.com", "*.example.com"]
    (tls,) = ingress["spec"]["tls"]
    assert set(tls["hosts"]) == set(hosts)
    for rule in ingress["spec"]["rules"]:
        (path,) = rule["http"]["paths"]
        assert (path["path"], path["pathType"]) == ("/v2", "Prefix")
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # The streaming settings, the same values as the nginx site.
    notes = ingress["metadata"]["annotations"]
    site = nginx_directives(SITE)
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    assert notes[prefix + "proxy-max-temp-file-size"] == "0"
    assert notes[prefix + "proxy-body-size"] == site["client_max_body_size"][0]
    assert seconds(notes[prefix + "proxy-read-timeout"]) == seconds(site["proxy_read_timeout"][0]) >= 600
    assert seconds(notes[prefix + "proxy-send-timeout"]) == seconds(site["proxy_send_timeout"][0]) >= 600
    assert notes[prefix + "proxy-buffer-size"] == site["proxy_buffer_size"][0]
    # One blob, one pod: the same consistent hash on the same key as the nginx site, onto single
    # pods (no subsets), over the pods' own endpoints (not the Service's one address).
    key, consistent = site["hash"][0].split()
    assert consistent == "consistent"
    assert notes[prefix + "upstream-hash-by"] == key == "$uri"
    assert not any(name.startswith(prefix + "upstream-hash-by-") for name in notes)
    assert prefix + "service-upstream" not in notes
    assert prefix + "load-balance" not in notes


def test_deployment_settings_are_real_and_valid(base, monkeypatch):
    settings = assert_valid_settings(env_of(base), monkeypatch)
    assert settings.workers >= 1
    assert settings.shutdown_timeout == 300


def test_routes_configmap_is_the_repository_table(base):
    text = only(base, "ConfigMap")["data"]["routes.toml"]
    assert tomllib.loads(text) == tomllib.loads((ROOT / "routes.toml").read_text())
    parse_routes(tomllib.loads(text), "configmap routes.toml", {})


# --- Containerfile ------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        statement = pending + stripped
        pending = ""
        keyword, _, args = statement.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(text: str) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and the instructions of each stage (FROM first)."""
    args: dict[str, str] = {}
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            result.append([])
        if not result:
            if keyword == "ARG" and "=" in rest:
                name, _, value = rest.partition("=")
                args[name] = value
            continue
        result[-1].append((keyword, rest))
    return args, result


def healthcheck_argv() -> list[str]:
    _, all_stages = stages(CONTAINERFILE.read_text())
    (check,) = [rest for keyword, rest in all_stages[-1] if keyword == "HEALTHCHECK"]
    command = check[check.index(" CMD ") + len(" CMD ") :]
    argv = json.loads(command)  # the exec form: no shell in the way
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def test_containerfile_bases_are_pinned():
    args, all_stages = stages(CONTAINERFILE.read_text())
    names: set[str] = set()
    for stage in all_stages:
        keyword, rest = stage[0]
        assert keyword == "FROM"
        parts = rest.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
        if image not in names:
            assert image.startswith("python:3.11-slim"), image
            name, _, tag = image.partition("@")[0].rpartition(":")
            assert "@sha256:" in image or (tag and tag != "latest" and "/" not in tag), image
        if len(parts) == 3 and parts[1].upper() == "AS":
            names.add(parts[2])
    assert len(all_stages) >= 2  # build and runtime


def test_containerfile_runtime_stage():
    _, all_stages = stages(CONTAINERFILE.read_text())
    runtime = all_stages[-1]
    keywords = [k for k, _ in runtime]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user, _, group = users[-1].partition(":")
    # Numeric, so that Kubernetes can check runAsNonRoot against the image.
    assert user.isdigit(), "USER must be a numeric UID"
    assert int(user) != 0
    assert group.isdigit()
    assert int(group) != 0
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k in ("RUN", "COPY"))
    assert ("EXPOSE", "5000") in runtime
    env = " ".join(rest for k, rest in runtime if k == "ENV")
    for assignment in (
        "GATEWAY_ROUTES=/etc/registry-gateway/routes.toml",
        "PYTHONDONTWRITEBYTECODE=1",
        "HOME=/tmp",
        "TMPDIR=/tmp",
    ):
        assert assignment in env
    assert ("COPY", "routes.toml /etc/registry-gateway/routes.toml") in runtime
    assert any(k == "COPY" and rest.startswith("--from=build ") for k, rest in runtime)
    entrypoint = json.loads(next(rest for k, rest in runtime if k == "ENTRYPOINT"))
    assert entrypoint == ["registry-gateway"]
    argv = healthcheck_argv()
    assert argv[0] == "python"
    assert "/healthz" in argv[-1]
    assert not any(tool in " ".join(argv) for tool in ("curl", "wget"))


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether a context path survives a .dockerignore (last matching pattern wins; ! re-includes)."""
    allowed = True
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            allowed = negate
    return allowed


def test_containerfile_copies_what_exists_in_the_context():
    ignore = CONTAINERFILE.with_name("Containerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    _, all_stages = stages(CONTAINERFILE.read_text())
    copied = 0
    for stage in all_stages:
        for keyword, rest in stage:
            if keyword in ("COPY", "ADD") and "--from=" not in rest:
                sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert dockerignore_allows(source, patterns), f"{source} is excluded from the build context"
                    copied += 1
    assert copied >= 4
    # Everything pip needs to build the project is copied.
    assert dockerignore_allows("gateway/app.py", patterns)
    assert not dockerignore_allows(".venv/bin/python", patterns)


@pytest.fixture(scope="module")
def k8s_like_gateway(base, tmp_path_factory) -> Iterator[Any]:
    """The real gateway with the ConfigMap's routes.toml and the Deployment's settings."""
    workdir = tmp_path_factory.mktemp("k8s-like")
    env = env_of(base)
    env.pop("GATEWAY_PORT")  # run_gateway picks a free port
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    with run_gateway(only(base, "ConfigMap")["data"]["routes.toml"], workdir, env=env) as gw:
        yield gw


def test_gateway_runs_with_the_deployments_settings(k8s_like_gateway, base):
    """What the probes and a ServiceMonitor ask for answers."""
    c = container(base)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = c[probe]["httpGet"]["path"]
        assert httpx.get(k8s_like_gateway.url + path, timeout=10).status_code == 200, path
    metrics = httpx.get(k8s_like_gateway.url + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")


def test_healthcheck_command_works(k8s_like_gateway):
    """The Containerfile's HEALTHCHECK, run as Docker would, passes on a live gateway and fails on a dead port."""
    argv = healthcheck_argv()
    argv[0] = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    alive = subprocess.run(argv, env={**env, "GATEWAY_PORT": str(k8s_like_gateway.port)}, timeout=30)
    assert alive.returncode == 0
    dead = subprocess.run(argv, env={**env, "GATEWAY_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert dead.returncode != 0


# --- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_references_existing_files(compose):
    here = COMPOSE.parent
    gateway = compose["services"]["gateway"]
    context = (here / gateway["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / gateway["build"]["dockerfile"]).resolve() == CONTAINERFILE
    mounts = 0
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (here / source).exists(), source
                mounts += 1
    assert mounts >= 3
    site = compose["services"]["nginx"]["volumes"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in site


def test_compose_service_settings(compose, monkeypatch):
    gateway = compose["services"]["gateway"]
    nginx = compose["services"]["nginx"]
    env = {k: str(v) for k, v in gateway["environment"].items()}
    settings = assert_valid_settings(env, monkeypatch)
    # nginx shares the gateway's network namespace and reaches it on loopback, which the default
    # GATEWAY_FORWARDED_ALLOW_IPS trusts; nothing else can reach the gateway.
    assert nginx["network_mode"] == "service:gateway"
    assert settings.host == "127.0.0.1"
    assert "GATEWAY_FORWARDED_ALLOW_IPS" not in env
    assert nginx["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert {"80:80", "443:443"} <= set(gateway["ports"])
    assert seconds(gateway["stop_grace_period"]) > settings.shutdown_timeout
    assert seconds(nginx["stop_grace_period"]) > settings.shutdown_timeout
    assert gateway["read_only"] is True
    assert any(t.startswith("/tmp") for t in gateway["tmpfs"])
    assert gateway["user"].split(":")[0] != "0"
    assert gateway["cap_drop"] == ["ALL"]
    for service in compose["services"].values():
        image = service["image"]
        assert ":" in image, image
        assert not image.endswith(":latest"), image


def test_compose_file_is_accepted_by_docker_compose(tmp_path):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/install installs it)")
    # docker-compose 1.29 (Debian 12) predates the top-level `name`; everything else it checks.
    text = COMPOSE.read_text()
    assert text.count("\nname: registry-gateway\n") == 1
    copy = tmp_path / "compose.yaml"
    copy.write_text(text.replace("\nname: registry-gateway\n", "\n"))
    argv = ["docker-compose", "--project-directory", str(COMPOSE.parent), "-f", str(copy), "config", "-q"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- nginx sites --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [SITE, COMPOSE_SITE], ids=["host", "compose"])
def test_nginx_accepts_the_site(source, tmp_path):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (scripts/install installs it)")
    pki = make_pki(tmp_path / "pki", ["gw.test", "*.gw.test"], ["127.0.0.1"])
    conf, _, _ = write_config(tmp_path / "nginx", source, upstream_port=5000, pki=pki)
    proc = check_config(tmp_path / "nginx", conf)
    assert proc.returncode == 0, proc.stderr
    assert "[warn]" not in proc.stderr, proc.stderr


def test_site_has_the_streaming_directives():
    d = nginx_directives(SITE)
    assert d["proxy_buffering"] == ["off"]
    assert d["proxy_request_buffering"] == ["off"]
    assert d["proxy_max_temp_file_size"] == ["0"]
    assert d["proxy_cache"] == ["off"]
    assert d["gzip"] == ["off"]
    assert d["proxy_http_version"] == ["1.1"]
    assert d["proxy_redirect"] == ["off"]
    for timeout in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
        assert seconds(d[timeout][0]) >= 600, timeout
    assert d["client_max_body_size"] == ["1m"]
    headers = dict(value.split(" ", 1) for value in d["proxy_set_header"])
    assert headers == {
        "Connection": '""',
        "Host": "$host",
        "X-Forwarded-Host": "$http_host",
        "X-Forwarded-Proto": "$scheme",
        "X-Forwarded-For": "$proxy_add_x_forwarded_for",
        "X-Request-Id": "$registry_gateway_request_id",
    }
    assert d["proxy_pass"] == ["http://registry_gateway"]
    assert d["keepalive"] == ["64"]
    assert d["server"] == ["127.0.0.1:5000"]
    assert d["hash"] == ["$uri consistent"]
    assert sorted(d["listen"]) == sorted(["80", "[::]:80", "443 ssl http2", "[::]:443 ssl http2"])
    assert d["return"] == ["301 https://$host$request_uri", "404"]
    assert sum("CHANGE-ME" in line for line in SITE.read_text().splitlines() if "ssl_certificate" in line) == 2


def upstream_block(path: Path) -> list[str]:
    """The directives of ``upstream registry_gateway { ... }``, in order, comments dropped."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    (body,) = re.findall(r"upstream registry_gateway \{(.*?)\}", text, re.S)
    return [" ".join(statement.split()) for statement in body.split(";") if statement.strip()]


@pytest.mark.parametrize("source", [SITE, COMPOSE_SITE], ids=["host", "compose"])
def test_upstream_hashes_before_keepalive(source):
    """One blob, one replica: the upstream block starts with the consistent hash, before keepalive.

    nginx wants any balancing method other than round-robin before ``keepalive``; after it,
    nginx 1.22 only warns "load balancing method redefined" (test_nginx_accepts_the_site fails
    on any warning) and reuses no connection.
    """
    block = upstream_block(source)
    assert block[0] == "hash $uri consistent"
    names = [statement.split()[0] for statement in block]
    assert names.count("hash") == 1
    assert names.index("hash") < names.index("keepalive")
    assert names.index("server") < names.index("keepalive")


def replicas_section() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    start = text.index("\n## Several replicas: one blob, one replica\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_docs_replica_snippets_match_the_shipped_files(base, tmp_path):
    """docs/deploy.md's nginx and ingress-nginx snippets are the shipped settings, for several replicas."""
    section = replicas_section()
    (nginx_block,) = re.findall(r"```nginx\n(.*?)```", section, re.S)
    (yaml_block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    snippet = tmp_path / "upstream.conf"
    snippet.write_text(nginx_block)
    documented = upstream_block(snippet)
    # The shipped block, with its one server line as several: one per replica, by address.
    servers = [s for s in documented if s.startswith("server ")]
    assert len(servers) >= 2
    assert len(set(servers)) == len(servers)
    assert all(re.fullmatch(r"server \d+\.\d+\.\d+\.\d+:5000", s) for s in servers)
    shipped = upstream_block(SITE)
    assert [s for s in documented if not s.startswith("server ")] == [s for s in shipped if not s.startswith("server ")]
    assert documented.index(servers[0]) == shipped.index("server 127.0.0.1:5000")
    # The annotation is the shipped Ingress's, value for value.
    notes = yaml.safe_load(yaml_block)["metadata"]["annotations"]
    shipped_notes = only(base, "Ingress")["metadata"]["annotations"]
    assert notes == {"nginx.ingress.kubernetes.io/upstream-hash-by": "$uri"}
    assert notes.items() <= shipped_notes.items()


def test_docs_replica_snippet_runs_in_the_site(tmp_path):
    """The documented upstream block, put in the shipped site in place of its own, passes ``nginx -t``."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (scripts/install installs it)")
    (nginx_block,) = re.findall(r"```nginx\n(.*?)```", replicas_section(), re.S)
    pki = make_pki(tmp_path / "pki", ["gw.test", "*.gw.test"], ["127.0.0.1"])
    conf, _, _ = write_config(tmp_path / "nginx", SITE, upstream_port=5000, pki=pki)
    site = tmp_path / "nginx" / "site.conf"
    text = site.read_text()
    (rendered,) = re.findall(r"(?ms)^upstream registry_gateway \{.*?^\}\n", text)
    site.write_text(text.replace(rendered, nginx_block))
    proc = check_config(tmp_path / "nginx", conf)
    assert proc.returncode == 0, proc.stderr
    assert "[warn]" not in proc.stderr, proc.stderr


def test_compose_site_differs_only_as_documented():
    def significant(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]

    host = significant(SITE.read_text())
    compose = significant(COMPOSE_SITE.read_text())
    expected = [
        line.replace("/etc/ssl/registry-gateway/", "/etc/nginx/certs/")
        for line in host
        if not line.startswith("listen [::]")
    ]

    def strip_comment(line: str) -> str:
        return line.split("#", 1)[0].strip()

    assert [strip_comment(line) for line in compose] == [strip_comment(line) for line in expected]


# --- systemd ------------------------------------------------------------------------------------


def unit_entries() -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order; systemd keys may repeat, so no configparser dict."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        assert current is not None
        sections[current].append((key.strip(), value.strip()))
    return sections


def test_unit_settings():
    service = unit_entries()["Service"]
    values: dict[str, list[str]] = {}
    for key, value in service:
        values.setdefault(key, []).append(value)
    environment = dict(item.split("=", 1) for line in values["Environment"] for item in line.split())
    for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert values[key] == ["yes"], key
    assert values["ProtectSystem"] == ["strict"]
    assert values["Restart"] == ["on-failure"]
    assert values["EnvironmentFile"] == ["-/etc/registry-gateway/credentials.env"]
    exec_start = values["ExecStart"][0].split()
    assert exec_start[0].endswith("/registry-gateway")
    assert exec_start[1:] == ["--routes", "/etc/registry-gateway/routes.toml"]
    shutdown = float(environment["GATEWAY_SHUTDOWN_TIMEOUT"])
    assert seconds(values["TimeoutStopSec"][0]) > shutdown
    assert values["KillMode"] == ["mixed"]


def test_unit_environment_is_valid(monkeypatch):
    service = unit_entries()["Service"]
    environment = dict(item.split("=", 1) for key, value in service if key == "Environment" for item in value.split())
    settings = assert_valid_settings(environment, monkeypatch)
    assert settings.host == "127.0.0.1"


def test_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists; stand one in at a path of our own.
    program = tmp_path / "registry-gateway"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/registry-gateway/bin/registry-gateway ") == 1
    unit = tmp_path / "registry-gateway.service"
    unit.write_text(text.replace("ExecStart=/opt/registry-gateway/bin/registry-gateway ", f"ExecStart={program} "))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings: there must be none.
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_systemd_exposure_is_low():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for registry-gateway\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout
