"""docker/k8s: every manifest passes the Kubernetes schemas (offline, strict: unknown fields are
errors), and the pieces fit each other and the service (names, ports, keys, settings, signals)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kdcache.service.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"
# The oldest Kubernetes release still commonly run, and the newest the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(folder: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((folder / "kustomization.yaml").read_text()))


def _resources(folder: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists (following folder entries), as written."""
    out: list[dict[str, Any]] = []
    for entry in _kustomization(folder)["resources"]:
        path = (folder / entry).resolve()
        out += _resources(path) if path.is_dir() else _docs(path)
    return out


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def objs() -> list[dict[str, Any]]:
    return _resources(K8S)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_manifest_passes_the_schemas() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    checked = 0
    for path in files:
        for doc in _docs(path):
            if doc["kind"] == "Kustomization" or doc["apiVersion"].startswith("monitoring."):
                continue  # not Kubernetes API objects: checked below
            for version in VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    assert checked == 7  # namespace, config, pvc, 2 deployments, service, secret example


def test_the_validator_rejects_what_kubernetes_would() -> None:
    worker = _docs(K8S / "worker.yaml")[0]
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 900  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_kustomizations_list_existing_files() -> None:
    for folder in (K8S, K8S / "monitoring"):
        for entry in _kustomization(folder)["resources"]:
            assert (folder / entry).exists(), f"{folder}/kustomization.yaml: {entry}"
    images = {i["name"] for i in _kustomization(K8S)["images"]}
    assert images == {"kdcache-service", "kdcache-worker"}


def test_service_routes_to_the_service_pods_with_probes_on_healthz(
    objs: list[dict[str, Any]],
) -> None:
    deploy = _one(objs, "Deployment", "kdcache-service")
    svc = _one(objs, "Service", "kdcache")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # the worker Deployment's pods must not match the Service
    worker_labels = _one(objs, "Deployment", "kdcache-worker")["spec"]["template"]["metadata"]
    assert not svc["spec"]["selector"].items() <= worker_labels["labels"].items()

    container = _container(deploy)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["name"] == "http" and svc_port["targetPort"] == "http"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    notes = deploy["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == ports["http"]


def test_settings_and_secrets_are_ones_the_service_reads(objs: list[dict[str, Any]]) -> None:
    config = _one(objs, "ConfigMap", "kdcache-config")["data"]
    (secret,) = _docs(K8S / "secret.example.yaml")
    keys = set(secret["stringData"])
    fields = {f"KDCACHE_{name.upper()}" for name in Settings.model_fields}
    for name in ("kdcache-service", "kdcache-worker"):
        container = _container(_one(objs, "Deployment", name))
        assert container["envFrom"] == [{"configMapRef": {"name": "kdcache-config"}}]
        for var, entry in _env(container).items():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == secret["metadata"]["name"]
                assert ref["key"] in keys, f"{name}: {var} from missing key {ref['key']}"
        if name == "kdcache-service":
            named = [v for v in [*_env(container), *config] if v.startswith("KDCACHE_")]
            unknown = sorted(set(named) - fields)
            assert not unknown, f"the service has no settings {unknown}"
            assert {"KDCACHE_ROOT", "KDCACHE_DB_URL", "KDCACHE_WORKER_TOKEN"} <= set(named)
    assert re.match(r"^s3://", config["KDCACHE_ROOT"])


def test_workers_take_one_gpu_and_reach_the_service(objs: list[dict[str, Any]]) -> None:
    worker = _one(objs, "Deployment", "kdcache-worker")
    container = _container(worker)
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    env = _env(container)
    assert env["KDCACHE_WORKER_DEVICE"]["value"] == "cuda:0"
    assert env["KDCACHE_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "worker-token"
    svc = _one(objs, "Service", "kdcache")
    assert env["KDCACHE_SERVER"]["value"] == f"http://kdcache:{svc['spec']['ports'][0]['port']}"
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for d in ("kdcache-service", "kdcache-worker")
        for v in _one(objs, "Deployment", d)["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"kdcache-data"} and _one(objs, "PersistentVolumeClaim", "kdcache-data")


def test_worker_prestop_leaves_time_to_release_before_the_kill(
    objs: list[dict[str, Any]],
) -> None:
    spec = _one(objs, "Deployment", "kdcache-worker")["spec"]["template"]["spec"]
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    m = re.fullmatch(r"kill -TERM 1; sleep (\d+); kill -TERM 1", command[2])
    assert m, command
    grace = spec["terminationGracePeriodSeconds"]
    # the second SIGTERM (release the shard) comes with at least a minute left for the POST
    assert grace - int(m.group(1)) >= 60 and int(m.group(1)) >= 300


def test_servicemonitor_scrapes_the_service_metrics_port(objs: list[dict[str, Any]]) -> None:
    mon_objs = _resources(K8S / "monitoring")
    assert len(mon_objs) == len(objs) + 1  # the base plus the ServiceMonitor
    mon = _one(mon_objs, "ServiceMonitor", "kdcache")
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    svc = _one(objs, "Service", "kdcache")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
