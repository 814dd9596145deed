"""A small kustomize for the subset deploy/kubernetes uses, for machines without a real one.

Supported: ``resources`` (files and directories), ``components``, ``namespace``, ``labels``
(``pairs`` on metadata only), ``configMapGenerator`` (``files`` and ``literals``) with
kustomize's content-hash name suffix and the references to it in pod specs, and ``images``
(``newName``, ``newTag``, ``digest``). Any other field is refused, so it never quietly renders
something kustomize would render differently; tests/test_deploy.py compares its output with
the real kustomize's whenever one is installed.

The order of work follows kustomize's: resources, generators, components, then this
kustomization's transformers; hash suffixes and name references last, once, at the top.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = frozenset(
    {"apiVersion", "kind", "namespace", "labels", "resources", "components", "configMapGenerator", "images"}
)
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "IngressClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "APIService",
    }
)


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


def build(directory: Path) -> list[Obj]:
    """Render the kustomization in ``directory``, like ``kustomize build``."""
    objects: list[Obj] = []
    generated: list[Obj] = []
    _accumulate(directory, "Kustomization", objects, generated)
    _add_hash_suffixes(objects, generated)
    return objects


def _load(directory: Path, kind: str) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            doc = yaml.safe_load(path.read_text()) or {}
            break
    else:
        raise FileNotFoundError(f"no kustomization in {directory}")
    unknown = set(doc) - SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(f"{directory}: {sorted(unknown)}")
    if doc.get("kind", "Kustomization") != kind:
        raise Unsupported(f"{directory}: expected kind {kind}, found {doc.get('kind')}")
    return doc


def _accumulate(directory: Path, kind: str, objects: list[Obj], generated: list[Obj]) -> None:
    """Add ``directory``'s objects to ``objects`` and apply its transformers to all of them.

    A Kustomization starts from nothing and its transformers see only its own objects; a
    Component adds to its parent's objects and transforms the lot.
    """
    doc = _load(directory, kind)
    own: list[Obj] = [] if kind == "Kustomization" else objects
    for entry in doc.get("resources", []):
        path = directory / entry
        if path.is_dir():
            sub: list[Obj] = []
            _accumulate(path, "Kustomization", sub, generated)
            own.extend(sub)
        else:
            own.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for generator in doc.get("configMapGenerator", []):
        configmap = _configmap(directory, generator)
        own.append(configmap)
        generated.append(configmap)
    for entry in doc.get("components", []):
        _accumulate(directory / entry, "Component", own, generated)
    _transform(doc, own)
    if own is not objects:
        objects.extend(own)


def _configmap(directory: Path, generator: dict[str, Any]) -> Obj:
    unknown = set(generator) - {"name", "files", "literals"}
    if unknown:
        raise Unsupported(f"configMapGenerator {generator.get('name')}: {sorted(unknown)}")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, path = entry.rpartition("=")
        data[key or Path(path).name] = (directory / path).read_text()
    for entry in generator.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}


def _transform(doc: dict[str, Any], objects: list[Obj]) -> None:
    namespace = doc.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for entry in doc.get("labels", []):
        if set(entry) - {"pairs"}:
            raise Unsupported(f"labels with {sorted(set(entry) - {'pairs'})}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in doc.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                container["image"] = _retag(container["image"], image)


def _pod_spec(obj: Obj) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return obj.get("spec")
    template = obj.get("spec", {}).get("template")
    if isinstance(template, dict) and obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return template.get("spec")
    return None


def _containers(obj: Obj) -> list[dict[str, Any]]:
    spec = _pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split(':', 1)[0]}" if head else tail.split(":", 1)[0]


def _retag(current: str, image: dict[str, Any]) -> str:
    if _image_name(current) != image["name"]:
        return current
    name = image.get("newName", image["name"])
    if "digest" in image:
        return f"{name}@{image['digest']}"
    if "newTag" in image:
        return f"{name}:{image['newTag']}"
    rest = current[len(_image_name(current)) :]
    return name + rest


def configmap_hash(configmap: Obj) -> str:
    """kustomize's name suffix: SHA-256 over Go's JSON of kind, name and data; 10 hex digits, some letters swapped.

    The name hashed is empty: that is what kustomize 5 does for generated ConfigMaps (its
    suffixes match this, while ``kubectl create configmap --append-hash`` hashes the name).
    """
    encoded = json.dumps(
        {"kind": "ConfigMap", "name": "", "data": configmap.get("data", {})},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's encoding/json escapes these for HTML safety.
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        encoded = encoded.replace(char, escaped)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _add_hash_suffixes(objects: list[Obj], generated: list[Obj]) -> None:
    renamed: dict[str, str] = {}
    for configmap in generated:
        old = configmap["metadata"]["name"]
        renamed[old] = f"{old}-{configmap_hash(configmap)}"
        configmap["metadata"]["name"] = renamed[old]
    for obj in objects:
        spec = _pod_spec(obj)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = renamed.get(volume["configMap"]["name"], volume["configMap"]["name"])
            for source in volume.get("projected", {}).get("sources", []):
                if "configMap" in source:
                    source["configMap"]["name"] = renamed.get(source["configMap"]["name"], source["configMap"]["name"])
        for container in _containers(obj):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = renamed.get(ref["name"], ref["name"])
            for env_from in container.get("envFrom", []):
                ref = env_from.get("configMapRef")
                if ref:
                    ref["name"] = renamed.get(ref["name"], ref["name"])


def normalized(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    """Objects by (kind, namespace, name), for comparing two renderings regardless of order."""
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): copy.deepcopy(o) for o in objects}
