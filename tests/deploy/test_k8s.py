"""The Kubernetes manifests under k8s/ stay valid and in step with the code.

No cluster needed: the YAML is parsed, the RayService's Serve application is compared with
deploy/serve_config.yaml, and every RAGTUNE_ variable is checked against ``Settings``.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
ALLOWED_PLAIN_ENV = {"HF_HUB_OFFLINE"}


def _manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))


def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _documents() if doc.get("kind") == kind]


def _rayservice() -> dict:
    services = _by_kind("RayService")
    assert len(services) == 1, "expected exactly one RayService under k8s/"
    return services[0]


def _ray_pod_specs(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def _serve_application(config: dict) -> dict:
    apps = config["applications"]
    assert len(apps) == 1, "expected a single Serve application"
    return apps[0]


def test_every_manifest_parses_and_names_itself():
    files = _manifest_files()
    assert files, "no YAML under k8s/"
    docs = _documents()
    assert {path for path, _ in docs} == set(files), "a YAML file holds no document"
    for path, doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
        for key in ("apiVersion", "kind"):
            assert doc.get(key), f"{path.name}: document without {key}"
        name = (doc.get("metadata") or {}).get("name")
        assert name, f"{path.name}: {doc['kind']} without metadata.name"


def test_kustomization_lists_exactly_the_other_files():
    kustomization = K8S / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    assert doc["kind"] == "Kustomization"
    resources = doc["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    others = {path.name for path in _manifest_files() if path != kustomization}
    assert set(resources) == others


def test_names_the_pods_use_exist():
    docs = _documents()
    services = {doc["metadata"]["name"] for _, doc in docs if doc["kind"] == "Service"}
    claims = {doc["metadata"]["name"] for _, doc in docs
              if doc["kind"] == "PersistentVolumeClaim"}
    assert {"ragtune-redis", "ragtune-milvus"} <= services
    for spec in _ray_pod_specs(_rayservice()):
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert claim["claimName"] in claims


def test_rayservice_runs_the_same_serve_application_as_the_local_config():
    local = _serve_application(yaml.safe_load(SERVE_CONFIG.read_text()))
    cluster_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    cluster = _serve_application(cluster_config)
    for key in ("import_path", "route_prefix", "name"):
        assert cluster[key] == local[key], key
    # The whole application (args, runtime_env) is the same; only http_options may differ.
    assert cluster == local
    assert cluster_config["http_options"]["host"] == "0.0.0.0"


def test_ray_pods_share_the_data_volume_and_the_environment():
    specs = _ray_pod_specs(_rayservice())
    assert len(specs) >= 2, "expected a head and at least one worker group"
    envs = []
    for spec in specs:
        (container,) = spec["containers"]
        envs.append(container["env"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        data = volumes[mounts["/data/ragtune"]]
        assert data["persistentVolumeClaim"]["claimName"] == "ragtune-data"
        assert container["resources"]["requests"] and container["resources"]["limits"]
    assert all(env == envs[0] for env in envs), "head and workers differ in env"
    values = {item["name"]: item.get("value") for item in envs[0]}
    assert values["RAGTUNE_HOME"] == "/data/ragtune"
    assert values["HF_HUB_OFFLINE"] == "1"
    # The settings must know the proxies listen beyond loopback (they then require the key),
    # and torch must not size its pools by the node's cores.
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert values["RAGTUNE_SERVE__HTTP_HOST"] == serve_config["http_options"]["host"]
    assert int(values["RAGTUNE_SERVE__TORCH_THREADS"]) >= 1
    assert int(values["RAGTUNE_TRAINER__TORCH_THREADS"]) >= 1
    # Beyond loopback the API key is required; it comes from a Secret, never a literal.
    key = next(item for item in envs[0] if item["name"] == "RAGTUNE_SERVE__API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "ragtune-api-key", "key": "key"}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in values


def test_one_pod_holds_the_resource_that_pins_the_sqlite_index():
    # SQLite's WAL works only within one host: the deployments opening the sparse index ask
    # for a share of this resource (deploy/app.py), so exactly one pod may declare it.
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    (container,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    values = {item["name"]: item.get("value") for item in container["env"]}
    name = values["RAGTUNE_SERVE__SPARSE_NODE_RESOURCE"]
    assert Settings(serve={"sparse_node_resource": name}).serve.sparse_node_resource == name

    def declared(group: dict) -> dict:
        text = (group.get("rayStartParams") or {}).get("resources")
        return json.loads(json.loads(text)) if text else {}  # KubeRay's quoted JSON string

    assert declared(cluster["headGroupSpec"]) == {name: 1}
    for group in cluster.get("workerGroupSpecs", []):
        assert name not in declared(group), f"worker group {group['groupName']} declares {name}"


def test_the_readmes_grpc_options_are_a_valid_serve_config_naming_the_servicer():
    from ray.serve.schema import ServeDeploySchema

    from deploy.stack import GRPC_SERVICER

    readme = (K8S / "README.md").read_text()
    block = re.search(r"\n((?: {4}grpc_options:\n)(?: {6}.*\n)+)", readme)
    assert block, "k8s/README.md shows no grpc_options block"
    grpc = yaml.safe_load(textwrap.dedent(block.group(1)))
    config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert "grpc_options" not in config, "gRPC is on: update k8s/README.md, which says off"
    schema = ServeDeploySchema.model_validate({**config, **grpc})
    assert schema.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]


def _env_names() -> list[str]:
    rayservice = _rayservice()
    names = []
    for spec in _ray_pod_specs(rayservice):
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            names += [item["name"] for item in container.get("env", [])]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for app in serve_config["applications"]:
        names += list((app.get("runtime_env") or {}).get("env_vars", {}))
    return names


def _settings_field_exists(name: str) -> bool:
    parts = name.removeprefix("RAGTUNE_").lower().split("__")
    fields = Settings.model_fields
    for i, part in enumerate(parts):
        if part not in fields:
            return False
        annotation = fields[part].annotation
        last = i == len(parts) - 1
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if last:
            return not is_section  # a whole section is not one variable
        if not is_section:
            return False
        fields = annotation.model_fields
    return False


@pytest.mark.parametrize("name", sorted(set(_env_names())))
def test_env_var_is_a_ragtune_setting_or_allowed(name):
    if name in ALLOWED_PLAIN_ENV:
        return
    assert name.startswith("RAGTUNE_"), f"{name} is neither RAGTUNE_* nor allowed"
    assert _settings_field_exists(name), f"{name} maps to no field of Settings"


def test_settings_mapping_rejects_unknown_names():
    assert _settings_field_exists("RAGTUNE_REDIS__URL")
    assert _settings_field_exists("RAGTUNE_HOME")
    assert not _settings_field_exists("RAGTUNE_REDIS__URI")
    assert not _settings_field_exists("RAGTUNE_REDIS")
    assert not _settings_field_exists("RAGTUNE_HOME__X")
