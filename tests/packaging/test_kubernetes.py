"""packaging/kubernetes: kinds, probes, grace period, and that the pieces refer to each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxyd.config import load_config_text
from proxyd.config.models import GatewayConfig, Server
from proxyd.master import KILL_GRACE
from tests.packaging._parse import DOCKERFILE, PACKAGING, dockerfile_instructions

K8S = PACKAGING / "kubernetes"
EXPECTED = {
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "configmap.yaml": ("v1", "ConfigMap"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
}
Doc = dict[str, Any]


def load(name: str) -> Doc:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, found {len(docs)}"
    doc: Doc = docs[0]
    return doc


@pytest.fixture(scope="module")
def manifests() -> dict[str, Doc]:
    return {name: load(name) for name in EXPECTED}


@pytest.fixture(scope="module")
def container(manifests: dict[str, Doc]) -> Doc:
    containers = manifests["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


@pytest.fixture(scope="module")
def gateway(manifests: dict[str, Doc]) -> GatewayConfig:
    text = manifests["configmap.yaml"]["data"]["gateway.yaml"]
    return load_config_text(text, "configmap.yaml:gateway.yaml",
                            env={"PROXYD_ADMIN_TOKEN": "test-token"})


def test_every_file_parses_with_its_kind() -> None:
    assert {p.name for p in K8S.glob("*.yaml")} == set(EXPECTED)
    for name, (api_version, kind) in EXPECTED.items():
        doc = load(name)
        assert (doc["apiVersion"], doc["kind"]) == (api_version, kind), name
        assert doc["metadata"]["name"]


def container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in by_name, f"no container port named {port!r}"
    return int(by_name[port])


def test_probes_use_the_traffic_port(container: Doc, gateway: GatewayConfig) -> None:
    traffic = {a.port for a in gateway.server.listen}
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/health"
    assert ready["path"] == "/health/ready"
    assert container_port(container, live["port"]) in traffic
    assert container_port(container, ready["port"]) in traffic


def test_listeners_reachable_in_a_pod(container: Doc, gateway: GatewayConfig) -> None:
    # 127.0.0.1 inside a pod is unreachable from the kubelet, the Service and Prometheus.
    assert all(a.host in ("0.0.0.0", "::") for a in gateway.server.listen)
    assert gateway.admin.listen.host in ("0.0.0.0", "::")
    assert container_port(container, "admin") == gateway.admin.listen.port
    assert gateway.server.watch_config is True  # ConfigMap edits reload


def test_resources(container: Doc) -> None:
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"cpu": "2", "memory": "1Gi"},
    }


def prestop_seconds(container: Doc) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_grace_period_outlasts_prestop_and_drain(manifests: dict[str, Doc], container: Doc,
                                                 gateway: GatewayConfig) -> None:
    pod = manifests["deployment.yaml"]["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert prestop_seconds(container) == 5
    for drain in (Server().drain_timeout, gateway.server.drain_timeout):
        assert grace > prestop_seconds(container) + drain + KILL_GRACE


def test_config_volume_is_the_configmap_directory(manifests: dict[str, Doc],
                                                  container: Doc) -> None:
    pod = manifests["deployment.yaml"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/proxyd"]
    assert len(mounts) == 1
    # A subPath mount never sees ConfigMap updates, and watch_config would have nothing to see.
    assert "subPath" not in mounts[0]
    configmap = manifests["configmap.yaml"]
    assert volumes[mounts[0]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert "gateway.yaml" in configmap["data"]


def test_admin_token_comes_from_a_secret(container: Doc) -> None:
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PROXYD_ADMIN_TOKEN"]["valueFrom"]


def test_pod_user_matches_the_image() -> None:
    useradd = next(args for instruction, args in dockerfile_instructions(DOCKERFILE.read_text())
                   if instruction == "RUN" and "useradd" in args)
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    assert f"--uid {pod['securityContext']['runAsUser']}" in useradd


def test_selectors_match(manifests: dict[str, Doc]) -> None:
    deployment = manifests["deployment.yaml"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        manifests["service.yaml"]["spec"]["selector"],
        manifests["pdb.yaml"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()


def test_service_targets_named_container_ports(manifests: dict[str, Doc],
                                               container: Doc) -> None:
    for port in manifests["service.yaml"]["spec"]["ports"]:
        container_port(container, port["targetPort"])


def test_hpa_scales_the_deployment_on_cpu(manifests: dict[str, Doc]) -> None:
    spec = manifests["hpa.yaml"]["spec"]
    deployment = manifests["deployment.yaml"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    cpu = [m["resource"] for m in spec["metrics"] if m["type"] == "Resource"]
    assert cpu == [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}]
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]


def test_pdb_leaves_one_pod_serving(manifests: dict[str, Doc]) -> None:
    spec = manifests["pdb.yaml"]["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable", 0) >= 1
    assert manifests["hpa.yaml"]["spec"]["minReplicas"] >= 2


def test_manifest_directory_is_applyable_as_is() -> None:
    # `kubectl apply -f packaging/kubernetes/` applies every file; nothing else may live there.
    assert all(p.suffix == ".yaml" for p in Path(K8S).iterdir())
