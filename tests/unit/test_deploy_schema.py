"""deploy/k8s validated against the Kubernetes OpenAPI schemas, offline.

The manifests are rendered with `kubectl kustomize` when kubectl is on PATH (what
`kubectl apply -k` sends); without it, the files kustomization.yaml lists are parsed and its
namespace is applied. Each object is checked with `kubernetes-validate` (schemas bundled in the
package, no network) in strict mode, so an unknown or misspelt field fails like a typo would
fail `kubectl apply --validate=strict`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes minor we support; newer ones keep these APIs (all GA: apps/v1,
# batch/v1, autoscaling/v2, policy/v1).
KUBERNETES_VERSION = "1.29"


def _rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if not doc:
                continue
            if doc["kind"] != "Namespace" and "namespace" in kustomization:
                doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
            docs.append(doc)
    return docs


DOCS = _rendered()


def test_kustomize_renders_every_listed_resource() -> None:
    kinds = {doc["kind"] for doc in DOCS}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "CronJob", "Job"} <= kinds
    assert all(
        doc["metadata"].get("namespace") == "freshrec" for doc in DOCS if doc["kind"] != "Namespace"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field() -> None:
    """Guards the guard: strict mode really catches an unknown field, offline."""
    deployment = next(doc for doc in DOCS if doc["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
