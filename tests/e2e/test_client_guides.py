"""Every tested example of docs/clients.md, run with the real client against the test gateway."""

from __future__ import annotations

import json
import shlex
import subprocess
import tomllib
from pathlib import Path

import yaml

from tests.e2e.clients import CLOSED, Containerd, Dockerd, Podman, Skopeo, in_namespace, verify_dir_copy
from tests.e2e.guides import adapt, example
from tests.support import Gateway
from tests.testbed.bed import Testbed


def test_docker_daemon_json_is_what_dockerd_runs_with(dockerd: Dockerd, gateway: Gateway):
    documented = json.loads(example("docker-daemon-json"))
    running = json.loads((dockerd.root / "daemon.json").read_text())
    assert running["registry-mirrors"] == [adapt(m, gateway.port) for m in documented["registry-mirrors"]]
    # ...and tests/e2e/test_docker.py pulls through it.


def test_docker_pull_by_host_name_and_path(dockerd: Dockerd, gateway: Gateway, testbed: Testbed):
    expected = {"org/app": testbed.images["app"].digest, "quay.io/coreos/etcd": testbed.images["etcd"].digest}
    for line in example("docker-pull").splitlines():
        argv = shlex.split(adapt(line, gateway.port, scheme=False))
        assert argv[:2] == ["docker", "pull"]
        ref = argv[2]
        dockerd.docker("pull", ref)
        name = ref.split("/", 1)[1].rsplit(":", 1)[0]
        assert any(d.endswith("@" + expected[name]) for d in dockerd.repo_digests(ref))
        dockerd.docker("image", "rm", ref)


def write_hosts(directory: Path, registry: str, documented: str, gateway: Gateway) -> None:
    doc = tomllib.loads(documented)
    assert doc["server"].startswith("https://")
    assert all(h["capabilities"] == ["pull", "resolve"] for h in doc["host"].values())
    text = adapt(documented, gateway.port).replace("gw.test", "127.0.0.1")
    text = text.replace(doc["server"], f"http://{CLOSED}")  # never the internet
    (directory / registry).mkdir(parents=True, exist_ok=True)
    (directory / registry / "hosts.toml").write_text(text)


def test_containerd_hosts_toml(containerd: Containerd, gateway: Gateway, testbed: Testbed, tmp_path: Path):
    documented = example("containerd-hosts-toml")
    for registry in ("docker.io", "ghcr.io", "quay.io"):
        write_hosts(tmp_path, registry, documented, gateway)
    pulls = {"docker.io/library/alpine:3.20": "alpine", "ghcr.io/org/app:v1": "app", "quay.io/coreos/etcd:v3.5": "etcd"}
    try:
        for ref, key in pulls.items():
            containerd.pull(ref, tmp_path)
            assert containerd.image_digest(ref) == testbed.images[key].digest
    finally:
        containerd.remove_all()


def test_containerd_hosts_toml_with_a_path(containerd: Containerd, gateway: Gateway, testbed: Testbed, tmp_path: Path):
    documented = example("containerd-hosts-toml-path")
    assert tomllib.loads(documented)["host"][f"https://{'mirror.example.com'}/v2/quay.io"]["override_path"] is True
    write_hosts(tmp_path, "quay.io", documented, gateway)
    try:
        containerd.pull("quay.io/coreos/etcd:v3.5", tmp_path)
        assert containerd.image_digest("quay.io/coreos/etcd:v3.5") == testbed.images["etcd"].digest
    finally:
        containerd.remove_all()


def test_node_script_makes_every_registry_go_through_the_gateway(
    containerd: Containerd, gateway: Gateway, testbed: Testbed, tmp_path: Path
):
    script = adapt(example("node-hosts-script"), gateway.port).replace("gw.test", "127.0.0.1")
    script = script.replace("/etc/containerd/certs.d", str(tmp_path))
    subprocess.run(["bash", "-c", script], check=True)
    registries = sorted(p.name for p in tmp_path.iterdir())
    assert {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"} <= set(registries)
    for registry in registries:  # fall back to a closed port, never the internet
        hosts = tmp_path / registry / "hosts.toml"
        server = tomllib.loads(hosts.read_text())["server"]
        hosts.write_text(hosts.read_text().replace(server, f"http://{CLOSED}"))
    try:
        for ref, key in {
            "docker.io/library/busybox:1.36": "busybox",
            "ghcr.io/org/app:v1": "app",
            "quay.io/coreos/etcd:v3.5": "etcd",
        }.items():
            containerd.pull(ref, tmp_path)
            assert containerd.image_digest(ref) == testbed.images[key].digest
    finally:
        containerd.remove_all()


def test_k3s_registries_yaml_matches_the_hosts_toml():
    doc = yaml.safe_load(example("k3s-registries-yaml"))
    hosts = tomllib.loads(example("containerd-hosts-toml"))
    (mirror,) = hosts["host"]
    assert set(doc) == {"mirrors"}
    assert {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"} <= set(doc["mirrors"])
    for entry in doc["mirrors"].values():
        assert entry == {"endpoint": [mirror]}


def test_kind_config():
    doc = yaml.safe_load(example("kind-config"))
    assert doc["kind"] == "Cluster"
    assert doc["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    (patch,) = doc["containerdConfigPatches"]
    registry = tomllib.loads(patch)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    (mount,) = doc["nodes"][0]["extraMounts"]
    assert registry["config_path"] == mount["containerPath"] == "/etc/containerd/certs.d"


def test_registries_conf_with_podman(podman: Podman, gateway: Gateway, testbed: Testbed, tmp_path: Path):
    documented = example("registries-conf")
    doc = tomllib.loads(documented)
    assert [r["prefix"] for r in doc["registry"]] == ["docker.io", "quay.io", "ghcr.io"]
    assert doc["registry"][1]["mirror"][0]["location"] == "mirror.example.com/quay.io"  # a mirror with a path
    text = adapt(documented, gateway.port, scheme=False)
    for registry in doc["registry"]:
        text = text.replace(f'location = "{registry["location"]}"', f'location = "{CLOSED}"')
    text = text.replace("[[registry.mirror]]\n", "[[registry.mirror]]\ninsecure = true\n")
    conf = tmp_path / "registries.conf"
    conf.write_text(text)
    for ref, key in {
        "docker.io/library/alpine:3.20": "alpine",
        "quay.io/coreos/etcd:v3.5": "etcd",
        "ghcr.io/org/app:v1": "app",
    }.items():
        podman("pull", ref, registries_conf=conf)
        assert podman.digest(ref, conf) == testbed.images[key].digest
        podman("rmi", ref, registries_conf=conf)


def test_skopeo_commands(skopeo: Skopeo, gateway: Gateway, testbed: Testbed, tmp_path: Path):
    for line in example("skopeo").splitlines():
        argv = shlex.split(adapt(line, gateway.port, scheme=False).replace("/tmp/app", str(tmp_path / "app")))
        assert argv[0] == "skopeo"
        argv.insert(2, "--src-tls-verify=false" if argv[1] == "copy" else "--tls-verify=false")
        proc = subprocess.run(
            in_namespace(["skopeo", "--policy", str(skopeo.policy), *argv[1:]], skopeo.hosts_file),
            capture_output=True,
            text=True,
            check=True,
        )
        if argv[1] == "inspect":
            assert json.loads(proc.stdout)["Digest"] == testbed.images["app"].digest
    verify_dir_copy(tmp_path / "app", testbed.images["app"])
