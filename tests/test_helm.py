"""The Helm chart, deploy/helm/registry-gateway, linted and rendered by real Helm (helm-python-sdk).

helm-python-sdk binds Helm v4's own Go SDK (lint, render, package): no helm binary, no cluster.

- ``helm lint --strict``: no message at all, with the defaults and with every optional object on.
- Rendered with the defaults and with everything on (ingress with TLS, HPA, PDB, ServiceMonitor,
  PrometheusRule): every object valid against the newest Kubernetes schema kubernetes-validate
  ships (strict: unknown fields fail); the two custom resources against schemas of their required
  fields. values.yaml: every key commented, typed in values.schema.json, in the README's table.
- The routes ConfigMap, from the defaults and from a values file with custom routes, starts the
  real gateway with the Deployment's settings; skopeo pulls through it, digests compared.
- deploy/kubernetes/registry-gateway.yaml is this chart's output, committed: a test fails when it
  drifts (``python -m tests.test_helm`` writes it again).
- docs/deploy.md's ``helm install``/``helm upgrade`` example is rendered exactly as written.
- The rendered Deployment runs for real: ``podman kube play`` of its pod spec, ConfigMap and
  Secret, with the image the suite builds (tests/image_build.py); skopeo pulls through it, digests
  compared; ``podman kube down``.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import httpx
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway import __version__
from gateway.routing.routes_file import parse_routes
from tests.e2e.clients import Skopeo, verify_dir_copy, write_hosts_file
from tests.e2e.conftest import gateway_routes
from tests.support import ROOT, free_port, run_gateway
from tests.testbed.bed import Testbed

CHART = ROOT / "deploy" / "helm" / "registry-gateway"
ALERTS = ROOT / "deploy" / "observability" / "alerts.yaml"
PLAIN = ROOT / "deploy" / "kubernetes"
PLAIN_VALUES = PLAIN / "values.yaml"
PLAIN_MANIFESTS = PLAIN / "registry-gateway.yaml"
PLAIN_RELEASE = "registry-gateway"
PLAIN_NAMESPACE = "registry-gateway"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

Obj = dict[str, Any]

# Every optional object on: the values a test of "everything" renders and lints with.
ALL_ON: Obj = {
    "ingress": {
        "enabled": True,
        "hosts": ["mirror.example.org", "*.mirror.example.org"],
        "tls": [{"secretName": "mirror-tls", "hosts": ["mirror.example.org", "*.mirror.example.org"]}],
    },
    "autoscaling": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "credentials": {"values": {"dockerhub-token": "t0ken"}},
    "tokenSecret": "0123456789abcdef0123456789abcdef",
    "extraEnvVars": [{"name": "GATEWAY_LOG_LEVEL", "value": "debug"}],
    "podAnnotations": {"example.org/team": "platform"},
    "podLabels": {"example.org/tier": "infra"},
    "priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "pull-secret"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "registry", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "preference": {"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["infra"]}]},
                }
            ]
        }
    },
    "service": {"annotations": {"example.org/scrape": "true"}},
    "sharedMemory": 268435456,
}


# --- rendering ----------------------------------------------------------------------------------


def rendered_files(values: Obj | None = None, *, name: str = "rg", namespace: str = "mirrors") -> dict[str, str]:
    """Template path -> rendered text, as ``helm template`` renders them (values checked against the schema)."""
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def objects_of(files: dict[str, str]) -> list[Obj]:
    found: list[Obj] = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        found += [doc for doc in yaml.safe_load_all(text) if doc]
    return found


def render(values: Obj | None = None, **kwargs: str) -> list[Obj]:
    return objects_of(rendered_files(values, **kwargs))


# The order kubectl apply and readers want: what others refer to first (Helm's install order).
KIND_ORDER = [
    "Secret",
    "ConfigMap",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "Ingress",
    "ServiceMonitor",
    "PrometheusRule",
]


def plain_manifests() -> str:
    """deploy/kubernetes/registry-gateway.yaml as the chart renders it with deploy/kubernetes/values.yaml."""
    values = helm_python.values_from_yaml(PLAIN_VALUES.read_text())
    files = rendered_files(values, name=PLAIN_RELEASE, namespace=PLAIN_NAMESPACE)
    docs: list[tuple[int, str, str]] = []
    for path, text in files.items():
        if path.endswith(".txt"):
            continue
        for doc in re.split(r"(?m)^---\s*$", text):
            parsed = yaml.safe_load(doc)
            if parsed:
                docs.append((KIND_ORDER.index(parsed["kind"]), path, doc.strip("\n")))
    header = (
        "# Generated from the Helm chart deploy/helm/registry-gateway with deploy/kubernetes/values.yaml:\n"
        f"#   helm template {PLAIN_RELEASE} deploy/helm/registry-gateway --namespace {PLAIN_NAMESPACE} \\\n"
        "#     -f deploy/kubernetes/values.yaml\n"
        "# Do not edit: change the chart or values.yaml, then `python -m tests.test_helm` writes this file\n"
        "# again (tests/test_helm.py fails while it differs from the chart's output).\n"
    )
    body = "\n".join(f"---\n# Source: {path}\n{doc}" for _, path, doc in sorted(docs))
    return header + body + "\n"


def only(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def container(objects: list[Obj]) -> Obj:
    (c,) = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(objects: list[Obj]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}


@pytest.fixture(scope="module")
def defaults() -> list[Obj]:
    return render()


@pytest.fixture(scope="module")
def everything() -> list[Obj]:
    return render(ALL_ON)


# --- lint and metadata --------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "everything"])
def test_lint_strict_is_clean(values):
    report = helm_python.lint(CHART, values, strict=True, namespace="mirrors")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    assert report["messages"] == [], report  # not even an info


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["type"] == "application"
    assert chart["appVersion"] == __version__
    for key in ("icon", "home"):
        assert chart[key].startswith("https://"), key
    assert chart["sources"]
    assert all(s.startswith("https://") for s in chart["sources"])


def test_package_carries_the_alert_rules(tmp_path):
    """``helm package`` follows files/alerts.yaml (a link to deploy/observability/alerts.yaml) into the archive."""
    assert (CHART / "files" / "alerts.yaml").resolve() == ALERTS.resolve()
    archive = helm_python.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("registry-gateway/files/alerts.yaml")
        assert member.isfile()
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == ALERTS.read_bytes()
        names = tar.getnames()
    for required in ("Chart.yaml", "values.yaml", "values.schema.json", "README.md", "templates/NOTES.txt"):
        assert f"registry-gateway/{required}" in names, required
    # The packaged chart renders the same PrometheusRule as the directory.
    with helm_python.Chart.load(archive) as packaged:
        files = packaged.render(ALL_ON, name="rg", namespace="mirrors")
    assert only(objects_of(files), "PrometheusRule") == only(render(ALL_ON), "PrometheusRule")


# Kubernetes' own types, passed through whole: documented and typed as one value.
OPAQUE = {"resources"}


def leaf_paths(values: Obj, prefix: str = "") -> list[str]:
    """Dotted paths of the values' leaves (an empty map, a list or a Kubernetes type is a leaf)."""
    paths: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in OPAQUE:
            paths += leaf_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def values_doc() -> Obj:
    doc = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_every_values_key_has_a_comment():
    """Each key line in values.yaml has a comment right above it (or above its parent map)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    keys = 0
    in_block = False
    for i, line in enumerate(lines):
        if in_block:  # the routes block scalar: TOML, not keys
            if line and not line.startswith(" "):
                in_block = False
            else:
                continue
        match = re.match(r"^(\s*)([A-Za-z][\w]*):( .*)?$", line)
        if not match:
            continue
        keys += 1
        in_block = (match.group(3) or "").strip() == "|"
        above = lines[i - 1].strip() if i else ""
        nested_map = match.group(3) is None
        assert above.startswith("#") or nested_map, f"values.yaml line {i + 1}: {line.strip()} has no comment"
    assert keys >= 40


def test_values_schema_covers_every_key_and_refuses_others():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def lookup(path: str) -> Obj:
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
        return node

    for path in leaf_paths(values_doc()):
        assert "type" in lookup(path) or "oneOf" in lookup(path) or "enum" in lookup(path), path
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(ALL_ON)
        for bad in ({"workers": 0}, {"replicaCount": "two"}, {"sharedMemory": "1G"}, {"tokenSecret": "short"}):
            with pytest.raises(helm_python.HelmValuesError):
                chart.validate_schema(bad)
        with pytest.raises(helm_python.HelmValuesError, match="additional properties"):
            chart.validate_schema({"ingres": {"enabled": True}})


def test_readme_has_every_value_in_its_table():
    readme = (CHART / "README.md").read_text()
    table = set(re.findall(r"^\| `([\w.]+)` \|", readme, re.M))
    assert set(leaf_paths(values_doc())) == table


# --- the objects --------------------------------------------------------------------------------


def kinds(objects: list[Obj]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def test_defaults_render_the_expected_objects(defaults):
    assert kinds(defaults) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    for obj in defaults:
        assert obj["metadata"]["namespace"] == "mirrors"
        assert obj["metadata"]["name"].startswith("rg-registry-gateway")
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "rg"


def test_everything_renders_every_object(everything):
    assert kinds(everything) == sorted(
        [
            "ConfigMap",
            "Secret",
            "Deployment",
            "Service",
            "Ingress",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "PrometheusRule",
        ]
    )


@pytest.mark.parametrize("case", ["defaults", "everything"])
def test_objects_are_valid_against_the_newest_schema(case, defaults, everything):
    version = kubernetes_validate.latest_version()
    checked = 0
    for obj in defaults if case == "defaults" else everything:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # custom resources: test_custom_resources_have_their_required_fields
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked == (4 if case == "defaults" else 7)


def test_strict_validation_is_not_vacuous(everything):
    version = kubernetes_validate.latest_version()
    ingress = copy.deepcopy(only(everything, "Ingress"))
    ingress["spec"]["tls"][0]["secret"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ingress, version, strict=True)


DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"}, "labels": LABELS},
}
# The required fields of the Prometheus Operator's v1 ServiceMonitor and PrometheusRule, and the
# types of those this chart sets; a misspelt field under spec fails as the CRD's strict decoding would.
SERVICEMONITOR_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": LABELS, "matchExpressions": {"type": "array"}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUSRULE_SCHEMA: Obj = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": DURATION},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "keep_firing_for": {"type": "string", "pattern": DURATION},
                                        "labels": LABELS,
                                        "annotations": LABELS,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_custom_resources_have_their_required_fields(everything):
    monitor = only(everything, "ServiceMonitor")
    jsonschema.validate(monitor, SERVICEMONITOR_SCHEMA)
    rule = only(everything, "PrometheusRule")
    jsonschema.validate(rule, PROMETHEUSRULE_SCHEMA)
    # The labels Prometheus selects them by.
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    # The schemas bite.
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["targetport"] = 5000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SERVICEMONITOR_SCHEMA)
    bad = copy.deepcopy(rule)
    del bad["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, PROMETHEUSRULE_SCHEMA)


def test_servicemonitor_scrapes_the_service(everything):
    monitor = only(everything, "ServiceMonitor")
    service = only(everything, "Service")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_prometheusrule_is_the_alerts_file(everything):
    """The one source: the PrometheusRule's groups are deploy/observability/alerts.yaml's, whatever its rules."""
    alerts = yaml.safe_load(ALERTS.read_text())
    assert alerts["groups"], "alerts.yaml has no groups"
    for group in alerts["groups"]:
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert "alert" in rule or "record" in rule
            assert rule["expr"]
    assert only(everything, "PrometheusRule")["spec"]["groups"] == alerts["groups"]


def test_ingress_streams_and_hashes_one_blob_onto_one_pod(everything):
    ingress = only(everything, "Ingress")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "upstream-hash-by"] == "$uri"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    assert notes[prefix + "proxy-max-temp-file-size"] == "0"
    assert notes[prefix + "ssl-redirect"] == "true"
    assert not any(name.startswith(prefix + "upstream-hash-by-") for name in notes)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert [r["host"] for r in ingress["spec"]["rules"]] == ALL_ON["ingress"]["hosts"]
    assert ingress["spec"]["tls"] == ALL_ON["ingress"]["tls"]
    service = only(everything, "Service")
    for rule in ingress["spec"]["rules"]:
        (path,) = rule["http"]["paths"]
        assert (path["path"], path["pathType"]) == ("/v2", "Prefix")
        assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    # The user's annotations win over the chart's, key by key.
    mine = render({"ingress": {"enabled": True, "annotations": {prefix + "proxy-read-timeout": "3600"}}})
    notes = only(mine, "Ingress")["metadata"]["annotations"]
    assert notes[prefix + "proxy-read-timeout"] == "3600"
    assert notes[prefix + "upstream-hash-by"] == "$uri"


def test_autoscaling_takes_over_the_replica_count(defaults, everything):
    assert only(defaults, "Deployment")["spec"]["replicas"] == 2
    assert "replicas" not in only(everything, "Deployment")["spec"]
    hpa = only(everything, "HorizontalPodAutoscaler")
    deployment = only(everything, "Deployment")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    pdb = only(everything, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_one_worker_needs_no_metrics_directory(defaults):
    """workers=1 (the default): no PROMETHEUS_MULTIPROC_DIR, no memory-backed emptyDir eating the limit."""
    assert env_of(defaults)["GATEWAY_WORKERS"] == "1"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_of(defaults)
    volumes = only(defaults, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert not any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes)
    several = render({"workers": 2})
    assert env_of(several)["GATEWAY_WORKERS"] == "2"
    metrics_dir = env_of(several)["PROMETHEUS_MULTIPROC_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in container(several)["volumeMounts"]}
    (volume,) = [
        v
        for v in only(several, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mounts[metrics_dir]
    ]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_shared_memory_is_rendered_only_when_set(defaults, everything):
    assert "GATEWAY_SHARED_MEMORY_BYTES" not in env_of(defaults)
    assert env_of(everything)["GATEWAY_SHARED_MEMORY_BYTES"] == "268435456"
    assert container(defaults)["resources"]["limits"]["memory"] == "512Mi"


def test_credentials_secret(defaults, everything):
    # Nothing to hold: no Secret; the pod mounts the name optionally, so a Secret made later is used.
    volumes = {v["name"]: v for v in only(defaults, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"]["optional"] is True
    secret = only(everything, "Secret")
    assert secret["stringData"] == {"dockerhub-token": "t0ken", "token-secret": ALL_ON["tokenSecret"]}
    volumes = {v["name"]: v for v in only(everything, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"]["secretName"] == secret["metadata"]["name"]
    (token,) = [e for e in container(everything)["env"] if e["name"] == "GATEWAY_TOKEN_SECRET"]
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "token-secret",
        "optional": True,
    }
    # An existing Secret: referenced, not rendered.
    existing = render({"credentials": {"existingSecret": "tokens", "values": {"x": "y"}}})
    assert "Secret" not in kinds(existing)
    volumes = {v["name"]: v for v in only(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["credentials"]["secret"]["secretName"] == "tokens"


def test_a_routes_change_rolls_the_pods(defaults):
    annotations = only(defaults, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    changed = render({"routes": '[[route]]\nname = "ghcr.io"\nupstream = "https://ghcr.io"\ndefault = true\n'})
    after = only(changed, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert after["checksum/routes"] != annotations["checksum/routes"]
    assert after["checksum/credentials"] == annotations["checksum/credentials"]
    again = only(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert again == annotations


def test_pod_options_are_passed_through(everything):
    spec = only(everything, "Deployment")["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == ALL_ON["priorityClassName"]
    assert spec["imagePullSecrets"] == ALL_ON["imagePullSecrets"]
    assert spec["nodeSelector"] == ALL_ON["nodeSelector"]
    assert spec["tolerations"] == ALL_ON["tolerations"]
    assert spec["affinity"] == ALL_ON["affinity"]
    metadata = only(everything, "Deployment")["spec"]["template"]["metadata"]
    assert metadata["annotations"]["example.org/team"] == "platform"
    assert metadata["labels"]["example.org/tier"] == "infra"
    assert env_of(everything)["GATEWAY_LOG_LEVEL"] == "debug"
    assert only(everything, "Service")["metadata"]["annotations"] == ALL_ON["service"]["annotations"]
    assert container(everything)["image"] == f"registry.example.com/registry-gateway:{__version__}"


def test_notes_tell_clients_where_to_point():
    notes = rendered_files(ALL_ON)["registry-gateway/templates/NOTES.txt"]
    assert "mirror.example.org" in notes
    for client in ("Docker", "containerd", "podman"):
        assert client in notes
    assert '"registry-mirrors": ["https://mirror.example.org"]' in notes


# --- the plain manifests ------------------------------------------------------------------------


def test_plain_manifests_are_the_charts_output():
    """deploy/kubernetes/registry-gateway.yaml is what the chart renders; `python -m tests.test_helm` updates it."""
    assert PLAIN_MANIFESTS.read_text() == plain_manifests(), "run `python -m tests.test_helm` and commit the result"


# --- the routes ConfigMap runs the gateway -------------------------------------------------------


def configmap_routes(objects: list[Obj]) -> str:
    text = only(objects, "ConfigMap")["data"]["routes.toml"]
    assert isinstance(text, str)
    return text


def test_default_routes_are_the_repository_table(defaults):
    assert tomllib.loads(configmap_routes(defaults)) == tomllib.loads((ROOT / "routes.toml").read_text())


def gateway_env(objects: list[Obj], workdir: Path) -> dict[str, str]:
    """The Deployment's environment, for a gateway run here (run_gateway picks the port)."""
    env = env_of(objects)
    env.pop("GATEWAY_PORT")
    if "PROMETHEUS_MULTIPROC_DIR" in env:
        (workdir / "metrics").mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
    return env


@pytest.fixture(scope="module")
def skopeo(tmp_path_factory: pytest.TempPathFactory) -> Skopeo:
    workdir = tmp_path_factory.mktemp("helm-skopeo")
    return Skopeo(workdir, write_hosts_file(workdir / "hosts"))


def custom_values(testbed: Testbed) -> str:
    """A values file as a user writes one: routes of their own (the test bed's), credentials by env."""
    return yaml.safe_dump(
        {
            "routes": gateway_routes(testbed),
            "extraEnvVars": [
                {"name": "E2E_GHCR_USER", "value": testbed.credentials.username},
                {"name": "E2E_GHCR_PASS", "value": testbed.credentials.password},
            ],
        }
    )


def test_default_routes_start_the_gateway(defaults, tmp_path):
    parse_routes(tomllib.loads(configmap_routes(defaults)), "configmap", {})
    with run_gateway(configmap_routes(defaults), tmp_path, env=gateway_env(defaults, tmp_path)) as gw:
        for path in ("/healthz", "/readyz"):
            assert httpx.get(gw.url + path, timeout=10).status_code == 200, path
        # A name no route serves: the registry's own error, not a 500 (nothing leaves the machine).
        resp = httpx.get(gw.url + "/v2/", headers={"Host": "nowhere.invalid"}, timeout=10)
        assert resp.status_code < 500


KUBE_PULLS = [("alpine", "127.0.0.1:{p}/alpine:3.20"), ("secret-app", "ghcr.gw.test:{p}/private/secret-app:v1")]


@pytest.mark.parametrize(("key", "ref"), KUBE_PULLS, ids=["default-route", "host-route-with-credentials"])
def test_custom_routes_values_file_pulls_intact(testbed: Testbed, skopeo: Skopeo, tmp_path: Path, key: str, ref: str):
    values_file = tmp_path / "my-values.yaml"
    values_file.write_text(custom_values(testbed))
    objects = render(helm_python.values_from_yaml(values_file.read_text()))
    routes = configmap_routes(objects)
    assert testbed.hub.url in routes
    with run_gateway(routes, tmp_path / "gw", env=gateway_env(objects, tmp_path)) as gw:
        dest = skopeo.copy_all(ref.format(p=gw.port), tmp_path / "copy")
        verify_dir_copy(dest, testbed.images[key])


# --- docs/deploy.md ------------------------------------------------------------------------------


def doc_example(name: str) -> str:
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    assert match, f"docs/deploy.md has no example {name!r}"
    return match.group(1)


def helm_commands() -> list[list[str]]:
    text = doc_example("helm-install").replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if line.startswith("helm ")]


def test_docs_helm_example_renders_exactly(tmp_path):
    """The values file and the helm install/upgrade lines of docs/deploy.md, as a reader pastes them."""
    commands = helm_commands()
    assert [c[:2] for c in commands] == [["helm", "install"], ["helm", "upgrade"]]
    values_text = doc_example("helm-values")
    assert values_text.startswith("# my-values.yaml\n")  # the file the commands name
    for argv in commands:
        release, chart_path = argv[2], argv[3]
        options = argv[4:]
        namespace = options[options.index("--namespace") + 1]
        values_name = options[options.index("-f") + 1]
        assert values_name == "my-values.yaml"
        assert (ROOT / chart_path).resolve() == CHART.resolve()
        values = helm_python.values_from_yaml(values_text)
        report = helm_python.lint(ROOT / chart_path, values, strict=True, namespace=namespace)
        assert report["errors"] == [], report
        assert report["messages"] == [], report
        objects = render(values, name=release, namespace=namespace)
        version = kubernetes_validate.latest_version()
        for obj in objects:
            if not obj["apiVersion"].startswith("monitoring.coreos.com/"):
                kubernetes_validate.validate(obj, version, strict=True)
        ingress = only(objects, "Ingress")
        assert ingress["spec"]["rules"][0]["host"] == values["ingress"]["hosts"][0]
        assert container(objects)["image"] == f"{values['image']['repository']}:{values['image']['tag']}"
        assert only(objects, "Deployment")["metadata"]["namespace"] == namespace
        # The routes parse, with the Secret's file where the pod mounts it.
        secret = tmp_path / "dockerhub-token"
        secret.write_text("t0ken\n")
        mounted = configmap_routes(objects).replace("/run/secrets/registry-gateway/dockerhub-token", str(secret))
        parse_routes(tomllib.loads(mounted), "docs", {})
        volumes = {v["name"]: v for v in only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
        assert volumes["credentials"]["secret"]["secretName"] == values["credentials"]["existingSecret"]


# --- podman kube play -----------------------------------------------------------------------------


def kube_play_yaml(objects: list[Obj], image: str, port: int) -> str:
    """The rendered ConfigMap, Secret and Deployment, adapted only as podman on one host needs.

    hostNetwork: the test bed lives on 127.0.0.1. The port: a free one (host networking shares the
    host's ports), bound to 127.0.0.1. The image: the one the suite built. One replica. Everything
    else (security context, volumes, env, the ConfigMap and Secret) is the chart's.
    """
    deployment = copy.deepcopy(only(objects, "Deployment"))
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    (c,) = spec["containers"]
    c["image"] = image
    for item in c["env"]:
        if item["name"] == "GATEWAY_PORT":
            item["value"] = str(port)
    c["env"].append({"name": "GATEWAY_HOST", "value": "127.0.0.1"})
    # On the host's network podman publishes no ports: the list goes, and probes name the number.
    del c["ports"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        c[probe]["httpGet"]["port"] = port
    docs = [only(objects, "ConfigMap"), only(objects, "Secret"), deployment]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module")
def kube_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from tests.image_build import Podman, build_image, make_base_rootfs, missing_tools

    if missing := missing_tools():
        pytest.fail(f"not installed: {', '.join(missing)} (scripts/install installs them)", pytrace=False)
    tarball = tmp_path_factory.mktemp("helm-base") / "base.tar"
    make_base_rootfs(tarball)
    podman = Podman(tmp_path_factory.mktemp("helm-pod"))  # short: podman refuses a runroot over 50 characters
    try:
        build = build_image(podman, tarball, "localhost/registry-gateway:helm-test")
        tarball.unlink()
        yield podman, build.image
    finally:
        podman.cleanup()


def wait_ready(url: str, podman: Any, pod: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            logs = podman("pod", "logs", pod, check=False)
            raise AssertionError(f"the pod did not become ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(0.2)


@pytest.mark.e2e
def test_podman_kube_play_of_the_rendered_pod(
    kube_image: tuple[Any, str], testbed: Testbed, skopeo: Skopeo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tests.image_build import host_ulimits

    podman, image = kube_image
    values = helm_python.values_from_yaml(custom_values(testbed))
    values["credentials"] = {"values": {"dockerhub-token": "t0ken"}}
    objects = render(values, name="kube", namespace="default")
    port = free_port()
    manifest = tmp_path / "kube.yaml"
    manifest.write_text(kube_play_yaml(objects, image, port))
    # podman kube play takes no --ulimit: the limits runc can set here go in containers.conf.
    options = host_ulimits()
    limits = [value for option, value in zip(options[::2], options[1::2], strict=True) if option == "--ulimit"]
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = " + json.dumps(limits) + "\n")
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))  # podman.env() passes the environment on
    podman("kube", "play", str(manifest), timeout=300)
    try:
        wait_ready(f"http://127.0.0.1:{port}", podman, "kube-registry-gateway-pod")
        (ctr,) = [c for c in json.loads(podman("ps", "--format", "json").stdout) if not c.get("IsInfra")]
        state = podman.inspect("container", ctr["Id"])
        # The chart's security context reached the container.
        assert state["Config"]["User"].split(":")[0] == "10001"
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        # The ConfigMap is the routes directory, /tmp the emptyDir.
        mounts = {m["Destination"] for m in state["Mounts"]}
        assert {"/etc/registry-gateway", "/tmp"} <= mounts
        # podman takes the rendered Secret in as a podman secret. podman 4.3 mounts no Secret
        # volumes (it supports hostPath, PVC, ConfigMap and emptyDir ones); the chart's mount is
        # optional, so the pod starts without it, as it would in a cluster before the Secret exists.
        (secret,) = json.loads(podman("secret", "inspect", only(objects, "Secret")["metadata"]["name"]).stdout)
        assert secret["Spec"]["Name"] == only(objects, "Secret")["metadata"]["name"]
        for key, ref in KUBE_PULLS:
            dest = skopeo.copy_all(ref.format(p=port), tmp_path / key)
            verify_dir_copy(dest, testbed.images[key])
    finally:
        down = podman("kube", "down", str(manifest), check=False, timeout=400)
        podman("secret", "rm", "--all", check=False)  # podman 4.3's kube down leaves secrets behind
    assert down.returncode == 0, down.stderr
    assert json.loads(podman("pod", "ps", "--format", "json").stdout) == []
    assert json.loads(podman("ps", "--all", "--format", "json").stdout) == []


if __name__ == "__main__":
    PLAIN_MANIFESTS.write_text(plain_manifests())
    print(f"wrote {PLAIN_MANIFESTS.relative_to(ROOT)}")
