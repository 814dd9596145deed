from pathlib import Path

import pytest

from gateway.http.errors import ConfigError, RegistryError
from gateway.routing.routes import GatewayTokens, RequestFacts, RouteTable, host_without_port
from gateway.routing.routes_file import load_routes, parse_routes

ROOT = Path(__file__).resolve().parents[3]

TABLE = {
    "route": [
        {
            "name": "docker.io",
            "upstream": "https://registry-1.docker.io",
            "hosts": ["docker.*", "hub.*"],
            "prefixes": ["index.docker.io"],
            "default": True,
            "library": True,
        },
        {"name": "ghcr.io", "upstream": "https://ghcr.io", "hosts": ["ghcr.*"]},
        {"name": "quay.io", "upstream": "https://quay.io", "hosts": ["quay.*"]},
        {
            "name": "registry.k8s.io",
            "upstream": "https://registry.k8s.io",
            "hosts": ["k8s.*"],
            "prefixes": ["k8s.gcr.io"],
        },
        {"name": "registry.local:5000", "upstream": "http://10.0.0.5:5000", "hosts": ["registry.example.org"]},
        {"name": "mirror.example", "upstream": "https://mirror.example", "hosts": ["*.mirror.test"]},
    ]
}


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return parse_routes(TABLE, "routes.toml", {})


def _route(**extra):
    return {"route": [{"name": "ghcr.io", "upstream": "https://ghcr.io", **extra}]}


# (host, name, ns) -> (route, upstream name, client path name)
RESOLUTION = [
    # 1. Host patterns: the whole path is the name.
    ("ghcr.example.com", "org/app", None, ("ghcr.io", "org/app", "org/app")),
    ("GHCR.Example.COM:8443", "org/app", None, ("ghcr.io", "org/app", "org/app")),
    ("quay.example.com", "coreos/etcd", "docker.io", ("quay.io", "coreos/etcd", "coreos/etcd")),  # host beats ns
    ("docker.example.com", "nginx", None, ("docker.io", "library/nginx", "nginx")),
    ("hub.example.com", "library/nginx", None, ("docker.io", "library/nginx", "library/nginx")),
    ("k8s.example.com", "pause", None, ("registry.k8s.io", "pause", "pause")),
    ("registry.example.org", "team/app", None, ("registry.local:5000", "team/app", "team/app")),
    ("a.mirror.test", "x/y", None, ("mirror.example", "x/y", "x/y")),
    # 2. Path prefixes on a host that matches no pattern.
    ("example.com", "ghcr.io/org/app", None, ("ghcr.io", "org/app", "ghcr.io/org/app")),
    ("example.com", "docker.io/nginx", None, ("docker.io", "library/nginx", "docker.io/nginx")),
    ("example.com", "docker.io/library/nginx", None, ("docker.io", "library/nginx", "docker.io/library/nginx")),
    (
        "example.com",
        "index.docker.io/bitnami/redis",
        None,
        ("docker.io", "bitnami/redis", "index.docker.io/bitnami/redis"),
    ),
    ("example.com", "k8s.gcr.io/pause", None, ("registry.k8s.io", "pause", "k8s.gcr.io/pause")),
    (
        "example.com",
        "registry.local:5000/team/app",
        None,
        ("registry.local:5000", "team/app", "registry.local:5000/team/app"),
    ),
    ("example.com", "ghcr.io/org/app", "quay.io", ("ghcr.io", "org/app", "ghcr.io/org/app")),  # prefix beats ns
    # 3. containerd's ns.
    ("example.com", "coreos/etcd", "quay.io", ("quay.io", "coreos/etcd", "coreos/etcd")),
    ("example.com", "library/redis", "docker.io", ("docker.io", "library/redis", "library/redis")),
    ("example.com", "pause", "k8s.gcr.io", ("registry.k8s.io", "pause", "pause")),
    ("127.0.0.1:5000", "coreos/etcd", "QUAY.IO", ("quay.io", "coreos/etcd", "coreos/etcd")),
    # 4. The default route (Docker's registry-mirrors).
    ("127.0.0.1:5000", "alpine", None, ("docker.io", "library/alpine", "alpine")),
    ("127.0.0.1:5000", "library/alpine", None, ("docker.io", "library/alpine", "library/alpine")),
    (None, "bitnami/redis", None, ("docker.io", "bitnami/redis", "bitnami/redis")),
    ("example.com", "foo.bar", None, ("docker.io", "library/foo.bar", "foo.bar")),
    ("example.com", "ghcr.io", None, ("docker.io", "library/ghcr.io", "ghcr.io")),  # a prefix alone is a name
    ("example.com", "x", "", ("docker.io", "library/x", "x")),  # empty ns is no ns
]


@pytest.mark.parametrize(("host", "name", "ns", "expected"), RESOLUTION)
def test_resolution(table, host, name, ns, expected):
    target = table.resolve(RequestFacts(host, name, ns))
    assert (target.route.name, target.upstream_name, target.client_path_name) == expected


@pytest.mark.parametrize(
    ("host", "name", "ns", "code"),
    [
        ("example.com", "evil.com/x/y", None, "NAME_UNKNOWN"),
        ("example.com", "localhost/x", None, "NAME_UNKNOWN"),
        ("example.com", "169.254.169.254:80/latest", None, "NAME_UNKNOWN"),
        ("example.com", "library/alpine", "evil.com", "NAME_UNKNOWN"),
        ("example.com", "ghcr.io/Org/App", None, "NAME_INVALID"),
        ("ghcr.example.com", "a" * 256, None, "NAME_INVALID"),
        # library/ must still fit in 255 characters.
        ("example.com", "a" * 250, None, "NAME_INVALID"),
    ],
)
def test_resolution_refusals(table, host, name, ns, code):
    with pytest.raises(RegistryError) as info:
        table.resolve(RequestFacts(host, name, ns))
    assert info.value.code == code
    assert info.value.status == (404 if code == "NAME_UNKNOWN" else 400)


def test_no_default_route_is_name_unknown():
    table = parse_routes({"route": [{"name": "ghcr.io", "upstream": "https://ghcr.io"}]}, "r.toml", {})
    with pytest.raises(RegistryError) as info:
        table.resolve(RequestFacts("example.com", "alpine"))
    assert info.value.code == "NAME_UNKNOWN"


@pytest.mark.parametrize(
    ("host", "expected"), [("a.b:5000", "a.b"), ("[::1]:5000", "[::1]"), ("A.B.", "a.b"), ("x", "x")]
)
def test_host_without_port(host, expected):
    assert host_without_port(host) == expected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "route: required key is missing"),
        ({**_route(), "routes": []}, "routes: unknown key"),
        (_route(upstrem="x"), "route #1 (ghcr.io): upstrem: unknown key"),
        ({"route": [{"upstream": "https://ghcr.io"}]}, "route #1: name: required key is missing"),
        (_route(upstream="ftp://ghcr.io"), "upstream: 'ftp://ghcr.io' is not an http:// or https:// URL"),
        (_route(upstream="https://"), "upstream: 'https://' has no host"),
        (_route(upstream="https://u:p@ghcr.io"), "credentials do not belong in the URL"),
        (_route(upstream="https://ghcr.io/v2"), "must be a bare origin"),
        (_route(upstream="https://ghcr.io:99999"), "has an invalid port"),
        (_route(hosts=["gh*r.*"]), "hosts: 'gh*r.*' is not a host name"),
        (_route(hosts=["*"]), "hosts: '*' is not a host name"),
        (_route(blob_redirect="maybe"), "blob_redirect: Input should be 'follow' or 'pass'"),
        (_route(default="yes please"), "default: Input should be a valid boolean"),
        (_route(name="Not A Host"), "name: 'Not A Host' is not a registry host name"),
        (_route(username_env="NOPE_USER", password_env="NOPE_PASS"), "environment variable NOPE_USER is not set"),
        (_route(username="u", password_env="NOPE_PASS"), "environment variable NOPE_PASS is not set"),
        (_route(username="u"), "credentials need both a username and a password"),
        (_route(username="u", password_file="/nonexistent/secret"), "password_file: cannot read /nonexistent/secret"),
        (
            {
                "route": [
                    {"name": "a.io", "upstream": "https://a.io", "hosts": ["x.*"]},
                    {"name": "b.io", "upstream": "https://b.io", "hosts": ["X.*"]},
                ]
            },
            "route 'b.io': host pattern 'x.*' is already claimed by route 'a.io'",
        ),
        (
            {
                "route": [
                    {"name": "a.io", "upstream": "https://a.io", "prefixes": ["b.io"]},
                    {"name": "b.io", "upstream": "https://b.io"},
                ]
            },
            "route 'b.io': prefix 'b.io' is already claimed by route 'a.io'",
        ),
        (
            {
                "route": [
                    {"name": "a.io", "upstream": "https://a.io", "default": True},
                    {"name": "b.io", "upstream": "https://b.io", "default": True},
                ]
            },
            "routes 'a.io' and 'b.io' are both default = true",
        ),
    ],
)
def test_config_errors_name_file_key_and_reason(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_routes(doc, "routes.toml", {})
    text = str(info.value)
    assert text.startswith("routes.toml: ")
    assert message in text
    assert "\n" not in text


def test_credentials_from_environment_and_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    env = {"GH_USER": "bob", "GH_PASS": "pw"}
    table = parse_routes(
        {
            "route": [
                {
                    "name": "ghcr.io",
                    "upstream": "https://ghcr.io",
                    "username_env": "GH_USER",
                    "password_env": "GH_PASS",
                },
                {"name": "quay.io", "upstream": "https://quay.io", "username": "alice", "password_file": str(secret)},
            ]
        },
        "routes.toml",
        env,
    )
    ghcr, quay = table.routes
    assert isinstance(ghcr.auth, GatewayTokens)
    assert isinstance(quay.auth, GatewayTokens)
    assert ghcr.auth.credentials is not None
    assert ghcr.auth.credentials.username == "bob"
    assert ghcr.auth.credentials.password == "pw"
    assert quay.auth.credentials is not None
    assert quay.auth.credentials.password == "s3cret"
    assert "pw" not in repr(ghcr)
    assert "s3cret" not in repr(quay)


def test_load_routes_reports_toml_errors(tmp_path):
    bad = tmp_path / "routes.toml"
    bad.write_text("[[route]\nname = 1\n")
    with pytest.raises(ConfigError, match=r"routes.toml: invalid TOML"):
        load_routes(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_routes(tmp_path / "missing.toml")


def test_default_routes_toml_is_valid():
    table = load_routes(ROOT / "routes.toml", environ={})
    names = {r.name for r in table.routes}
    assert {
        "docker.io",
        "ghcr.io",
        "gcr.io",
        "registry.k8s.io",
        "quay.io",
        "mcr.microsoft.com",
        "nvcr.io",
        "public.ecr.aws",
        "docker.elastic.co",
    } <= names
    assert table.default is not None
    assert table.default.name == "docker.io"
    assert table.default.library
    assert getattr(table.route_for_host("ghcr.example.com"), "name", None) == "ghcr.io"
    assert getattr(table.route_for_host("quay.example.com"), "name", None) == "quay.io"
    assert getattr(table.route_for_host("gcr.example.com"), "name", None) == "gcr.io"
    assert getattr(table.route_for_host("k8s.example.com"), "name", None) == "registry.k8s.io"
    assert table.resolve(RequestFacts("example.com", "k8s.gcr.io/pause")).route.name == "registry.k8s.io"
    for route in table.routes:
        assert route.upstream.scheme == "https"
