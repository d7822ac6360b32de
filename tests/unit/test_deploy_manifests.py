"""Static checks of the deployment files (Dockerfile, deploy/compose, deploy/k8s).

Nothing here needs Docker or a cluster: the YAML is parsed and cross-checked against itself, the
Dockerfile and `freshrec.config`, so a renamed setting or port breaks a test, not a rollout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from freshrec.config import NON_SETTING_ENV, FreshRecConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
WORKLOAD_KINDS = {"Deployment", "Job", "CronJob"}
GRPC_SERVICES = {"ranking": 50051, "updater": 50052}

Doc = dict[str, Any]


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in {".yaml", ".yml"})


def _load(path: Path) -> list[Doc]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


@pytest.fixture(scope="module")
def k8s_docs() -> list[Doc]:
    return [
        doc for path in _yaml_files(K8S) if path.name != "kustomization.yaml" for doc in _load(path)
    ]


@pytest.fixture(scope="module")
def compose() -> Doc:
    (doc,) = _load(COMPOSE_FILE)
    return doc


def _of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in _of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def _pod_template(workload: Doc) -> Doc:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def _workloads(docs: list[Doc]) -> Iterator[Doc]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def _is_freshrec_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0] in {"freshrec", "freshrec-gpu"}


def _freshrec_workloads(docs: list[Doc]) -> list[Doc]:
    return [
        w
        for w in _workloads(docs)
        if any(_is_freshrec_image(c["image"]) for c in _pod_template(w)["spec"]["containers"])
    ]


def _container(docs: list[Doc], deployment: str) -> Doc:
    (container,) = _named(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _config_map(docs: list[Doc]) -> Doc:
    (config_map,) = _of_kind(docs, "ConfigMap")
    return config_map


def _dockerfile_uid() -> int:
    match = re.search(r"useradd\b.*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert match, "Dockerfile creates no user with a fixed --uid"
    return int(match.group(1))


def _config_field_error(name: str) -> str | None:
    """Why FreshRecConfig would reject env var `name`, or None when it maps to a field (or is
    one of the FRESHREC_ variables that are not settings, such as FRESHREC_LOG_FORMAT)."""
    if not name.startswith("FRESHREC_") or name in NON_SETTING_ENV:
        return None
    path = name.removeprefix("FRESHREC_").lower().split("__")
    fields = FreshRecConfig.model_fields
    if path[0] not in fields:
        return f"{name}: FreshRecConfig has no field {path[0]!r}"
    if len(path) == 1:
        return None
    section = fields[path[0]].annotation
    if len(path) != 2 or not (isinstance(section, type) and issubclass(section, BaseModel)):
        return f"{name}: {path[0]!r} is not a section with plain fields"
    if path[1] not in section.model_fields:
        return f"{name}: {section.__name__} has no field {path[1]!r}"
    return None


def _build_config(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> FreshRecConfig:
    """FreshRecConfig as a process with exactly this FRESHREC_ environment would build it."""
    for name in [n for n in os.environ if n.startswith("FRESHREC_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return FreshRecConfig()


# --- every file ---


def test_every_yaml_file_under_deploy_parses_to_mappings() -> None:
    files = _yaml_files(DEPLOY)
    assert COMPOSE_FILE in files
    assert K8S / "kustomization.yaml" in files
    for path in files:
        docs = _load(path)
        assert docs, f"{path} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_every_k8s_manifest_names_its_kind(k8s_docs: list[Doc]) -> None:
    for doc in k8s_docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    (kustomization,) = _load(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {p.name for p in _yaml_files(K8S)} - {"kustomization.yaml"}
    assert set(listed) == on_disk


# --- Kubernetes ---


def test_deployment_selectors_match_their_template_labels(k8s_docs: list[Doc]) -> None:
    deployments = _of_kind(k8s_docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} >= {"ranking", "updater", "redis"}
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector, deployment["metadata"]["name"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]


def test_deployment_selectors_do_not_overlap(k8s_docs: list[Doc]) -> None:
    deployments = _of_kind(k8s_docs, "Deployment")
    for owner in deployments:
        selector = owner["spec"]["selector"]["matchLabels"].items()
        for other in deployments:
            if other is not owner:
                labels = other["spec"]["template"]["metadata"]["labels"].items()
                assert not selector <= labels, (
                    owner["metadata"]["name"],
                    other["metadata"]["name"],
                )


def test_every_service_target_port_exists_in_the_selected_pods(k8s_docs: list[Doc]) -> None:
    for service in _of_kind(k8s_docs, "Service"):
        name = service["metadata"]["name"]
        selector = service["spec"]["selector"].items()
        pods = [
            _pod_template(w)
            for w in _workloads(k8s_docs)
            if selector <= _pod_template(w)["metadata"]["labels"].items()
        ]
        assert pods, f"Service {name} selects no pod template"
        for pod in pods:
            ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
            names = {p["name"] for p in ports if "name" in p}
            numbers = {p["containerPort"] for p in ports}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in (names if isinstance(target, str) else numbers), (name, target)


@pytest.mark.parametrize(("name", "port"), sorted(GRPC_SERVICES.items()))
def test_grpc_servers_are_probed_with_native_grpc_probes_on_their_port(
    k8s_docs: list[Doc], name: str, port: int
) -> None:
    container = _container(k8s_docs, name)
    assert port in {p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, (name, probe)


@pytest.mark.parametrize(("name", "port"), sorted(GRPC_SERVICES.items()))
def test_grpc_servers_bind_the_probed_port_on_all_interfaces(
    k8s_docs: list[Doc], monkeypatch: pytest.MonkeyPatch, name: str, port: int
) -> None:
    container = _container(k8s_docs, name)
    env = dict(_config_map(k8s_docs)["data"])
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    section = getattr(_build_config(monkeypatch, env), name)
    assert (section.host, section.port) == ("0.0.0.0", port)


def test_ranking_runs_replicated_and_updater_runs_alone_on_a_gpu(k8s_docs: list[Doc]) -> None:
    assert _named(k8s_docs, "Deployment", "ranking")["spec"]["replicas"] >= 2
    updater = _named(k8s_docs, "Deployment", "updater")
    pod = updater["spec"]["template"]["spec"]
    # The updater is the registry's only writer: never two pods, not even during a rollout.
    assert updater["spec"]["replicas"] == 1
    assert updater["spec"]["strategy"]["type"] == "Recreate"
    assert int(_container(k8s_docs, "updater")["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_every_freshrec_workload_mounts_the_one_shared_claim_at_the_workdir(
    k8s_docs: list[Doc],
) -> None:
    (pvc,) = _of_kind(k8s_docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    workdir = _config_map(k8s_docs)["data"]["FRESHREC_WORKDIR"]
    workloads = _freshrec_workloads(k8s_docs)
    assert {(w["kind"], w["metadata"]["name"]) for w in workloads} == {
        ("Deployment", "ranking"),
        ("Deployment", "updater"),
        ("CronJob", "materialize"),
        ("CronJob", "index-rebuild"),
        ("Job", "init"),
    }
    for workload in workloads:
        pod = _pod_template(workload)["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert set(claims.values()) == {pvc["metadata"]["name"]}, workload["metadata"]["name"]
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get(workdir) in claims, (workload["metadata"]["name"], container["name"])
            command = container.get("command", []) + container.get("args", [])
            assert f"--workdir {workdir}" in " ".join(command), container["name"]


def test_freshrec_pods_read_the_config_map_and_run_as_the_image_user(
    k8s_docs: list[Doc],
) -> None:
    config_map_name = _config_map(k8s_docs)["metadata"]["name"]
    uid = _dockerfile_uid()
    for workload in _freshrec_workloads(k8s_docs):
        pod = _pod_template(workload)["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["securityContext"]["fsGroup"] == uid
        for container in pod.get("initContainers", []) + pod["containers"]:
            refs = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
            assert refs == [config_map_name], (workload["metadata"]["name"], container["name"])


def test_k8s_environment_is_accepted_by_freshrec_config(
    k8s_docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = {name: str(value) for name, value in _config_map(k8s_docs)["data"].items()}
    assert all(name.startswith("FRESHREC_") for name in shared)
    for workload in _freshrec_workloads(k8s_docs):
        for container in _pod_template(workload)["spec"]["containers"]:
            env = shared | {e["name"]: e["value"] for e in container.get("env", [])}
            errors = [err for name in env if (err := _config_field_error(name))]
            assert not errors, errors
            config = _build_config(monkeypatch, env)
            assert config.online_store == "redis"


def test_k8s_redis_url_names_the_redis_service(k8s_docs: list[Doc]) -> None:
    url = _config_map(k8s_docs)["data"]["FRESHREC_REDIS_URL"]
    match = re.fullmatch(r"redis://([a-z0-9.-]+):(\d+)/\d+", url)
    assert match, url
    service = _named(k8s_docs, "Service", match.group(1).split(".")[0])
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}


def test_materialize_runs_hourly_without_overlap(k8s_docs: list[Doc]) -> None:
    cron = _named(k8s_docs, "CronJob", "materialize")
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour == "*" and rest == ["*", "*", "*"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


# --- Docker Compose ---


def _compose_volume_source(entry: str | Doc) -> str:
    return entry["source"] if isinstance(entry, dict) else entry.split(":", 1)[0]


def test_compose_services_use_defined_volumes_and_services(compose: Doc) -> None:
    services = compose["services"]
    defined = set(compose.get("volumes") or {})
    for name, service in services.items():
        for entry in service.get("volumes", []):
            source = _compose_volume_source(entry)
            if not source.startswith((".", "/", "~")):
                assert source in defined, (name, source)
        assert set(service.get("depends_on", {})) <= services.keys(), name


def test_compose_freshrec_services_share_one_volume_at_the_workdir(compose: Doc) -> None:
    freshrec = {n: s for n, s in compose["services"].items() if _is_freshrec_image(s["image"])}
    assert set(freshrec) == {"init", "ranking", "updater", "materialize"}
    mounts = set()
    for service in freshrec.values():
        workdir = service["environment"]["FRESHREC_WORKDIR"]
        mounts |= {
            (_compose_volume_source(v), v.split(":")[1] if isinstance(v, str) else v["target"])
            for v in service["volumes"]
        }
        assert f"--workdir {workdir}" in " ".join(service["command"])
    assert len(mounts) == 1
    ((_, target),) = mounts
    assert target == "/var/lib/freshrec"


def test_compose_environment_is_accepted_by_freshrec_config(
    compose: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in compose["services"].items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        if not _is_freshrec_image(service["image"]):
            continue
        errors = [err for var in env if (err := _config_field_error(var))]
        assert not errors, errors
        config = _build_config(monkeypatch, env)
        assert config.online_store == "redis", name
        host = re.fullmatch(r"redis://([a-z0-9-]+):6379/\d+", config.redis_url)
        assert host and host.group(1) in compose["services"], config.redis_url


@pytest.mark.parametrize(("name", "port"), sorted(GRPC_SERVICES.items()))
def test_compose_grpc_healthchecks_ask_the_served_port(
    compose: Doc, monkeypatch: pytest.MonkeyPatch, name: str, port: int
) -> None:
    service = compose["services"][name]
    config = _build_config(monkeypatch, service["environment"])
    assert getattr(config, name).port == port
    assert getattr(config, name).host == "0.0.0.0"
    check = " ".join(service["healthcheck"]["test"])
    assert "grpc_health.v1" in check and f"127.0.0.1:{port}" in check
    assert any(p.endswith(f":{port}") for p in service["ports"])
    assert service["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_redis_is_health_checked_and_materialize_is_on_demand(compose: Doc) -> None:
    services = compose["services"]
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert services["materialize"]["profiles"]
    assert all(not s.get("profiles") for n, s in services.items() if n != "materialize")


# --- image ---


def test_dockerfile_installs_cpu_torch_before_the_project_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    torch_at = text.index('pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"')
    project_at = text.index("--editable /opt/freshrec")
    assert torch_at < project_at
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert re.search(r"^FROM python:3\.11-slim\b|^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == f"{_dockerfile_uid()}:{_dockerfile_uid()}"
    assert re.findall(r"^ENTRYPOINT (.+)$", text, re.M) == ['["freshrec"]']
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".freshrec"} <= ignored


def test_the_ranking_deployment_is_autoscaled_on_cpu() -> None:
    docs = [
        doc
        for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    hpas = [d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1
    hpa = hpas[0]["spec"]
    target = hpa["scaleTargetRef"]
    deployments = {d["metadata"]["name"] for d in docs if d.get("kind") == "Deployment"}
    assert target["kind"] == "Deployment" and target["name"] == "ranking" in deployments
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert any(m["resource"]["name"] == "cpu" for m in hpa["metrics"] if m["type"] == "Resource")
