"""The container and cluster entry points are checked offline: compose.yaml's structure, every
Kubernetes manifest against the Kubernetes schemas (kubernetes-validate ships them), and every
`labkit ...` command line they run against labkit's real argument parser, so that a renamed or
removed flag fails here rather than in a cluster. hadolint on the Dockerfile is in test_env.py."""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

# A dev dependency that ships the Kubernetes JSON schemas (absent on the GPU machine).
kubernetes_validate = pytest.importorskip("kubernetes_validate")
ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"
# The newest Kubernetes release whose schemas kubernetes-validate==1.37.0 ships.
KUBERNETES_VERSION = "1.37.0"
# Custom resources the Kubernetes schemas do not cover: their structure is checked below.
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject")}
# The values README.md shows for the server (besides the defaults in compose.yaml).
README_ENVIRONMENT = {"LABKIT_MODEL": "synthetic:llama-3.2-3b", "LABKIT_MODE": "batched"}


# --- loading -------------------------------------------------------------------------------------

def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _one(kind: str) -> dict:
    found = [d for p in _manifest_files() for d in _documents(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/kubernetes, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$ substitution, from `env` only
    (not this machine's environment, so the test is deterministic)."""
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, op, default = match["name"], match["op"], match["default"]
        if name in env and (env[name] or op != ":-"):
            return env[name]
        assert op is not None, f"${{{name}}} has no default: `docker compose up` alone breaks"
        return default

    return re.sub(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}", sub, value)


def _seconds(duration) -> float:
    """A Compose duration ('320s', '5m', '1m30s', or a number of seconds)."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(duration))
    assert parts and any(parts.groups()), f"not a Compose duration: {duration!r}"
    h, m, s = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + s


def _parse_labkit(argv: list[str]):
    """Run a `labkit ...` command line through labkit's own argument parser. Abbreviated flags
    are refused here (argparse accepts `--drain-time` for `--drain-timeout`), so that a flag
    renamed to something longer is caught too."""
    from labkit.cli import build_parser

    assert argv and argv[0] == "labkit", f"not a labkit command line: {argv}"
    parser = build_parser(argv[1])
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    return parser.parse_args(argv[1:])


def _container_argv(container: dict) -> list[str]:
    """What a container runs, given the image's ENTRYPOINT ["tini", "--"]: `args` alone replace
    the CMD, `command` replaces the ENTRYPOINT."""
    return list(container.get("command", [])) + list(container.get("args", []))


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- Kubernetes: schemas -------------------------------------------------------------------------

@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schemas(path):
    documents = _documents(path)
    assert documents, f"{path.name} is empty"
    for doc in documents:
        if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_RESOURCES:
            continue  # a CRD: test_keda_scaled_object_structure checks it
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata'].get('name')}: "
                        f"{err.message} at {'.'.join(map(str, err.path))}")


def test_schema_validation_catches_a_typo_and_a_wrong_type():
    """Guards the test above: a validator that cannot fail proves nothing."""
    deployment = _one("Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "330"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_existing_manifests_and_the_readme_covers_the_others():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    kinds = {d["kind"] for name in listed for d in _documents(K8S / name)}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    readme = (K8S / "README.md").read_text()
    for path in _manifest_files():
        assert path.name in readme, f"deploy/kubernetes/README.md does not explain {path.name}"
    assert "kubectl apply -k deploy/kubernetes" in readme


# --- Kubernetes: what the manifests must say -----------------------------------------------------

def test_deployment_serves_on_one_gpu_with_probes_and_a_drain():
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    [container] = spec["containers"]
    assert container["image"].split(":")[0] == "gpu-inference-lab"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(p["containerPort"] == 8000 for p in container["ports"])

    def probe(name):
        get = container[name]["httpGet"]
        port = get["port"]
        if isinstance(port, str):  # a named port
            port = next(p["containerPort"] for p in container["ports"] if p.get("name") == port)
        return get["path"], port

    assert probe("readinessProbe") == ("/health", 8000)
    assert probe("livenessProbe") == ("/", 8000)
    assert probe("startupProbe") == ("/health", 8000)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, \
        "the startup probe must allow minutes for model load and warm-up"

    argv = _container_argv(container)
    drain = float(_flag(argv, "--drain-timeout"))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain, \
        "the grace period must cover the preStop sleep and labkit's drain"

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_service_and_job_reach_the_deployment():
    deployment, service, job = _one("Deployment"), _one("Service"), _one("Job")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["port"] == 8000

    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].split(":")[0] == "gpu-inference-lab"
    argv = _container_argv(container)
    assert argv[:2] == ["labkit", "loadtest"]
    url = urlsplit(_flag(argv, "--url"))
    assert (url.hostname, url.port, url.path) == (service["metadata"]["name"], 8000, "/generate")
    assert (_flag(argv, "--concurrency"), _flag(argv, "--requests")) == ("5", "50")
    assert "nvidia.com/gpu" not in json.dumps(job), "the load test client needs no GPU"


def _pod_specs() -> dict[str, dict]:
    return {kind: _one(kind)["spec"]["template"]["spec"] for kind in ("Deployment", "Job")}


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec breaks the "restricted" Pod Security Standard (Kubernetes' own list:
    non-root, seccomp RuntimeDefault or Localhost, no privilege escalation, every capability
    dropped, nothing of the host's), plus this project's rules: a read-only root filesystem, no
    service-account token, and CPU, memory and ephemeral-storage limits on every container."""
    found = []
    context = pod.get("securityContext", {})
    if context.get("runAsNonRoot") is not True:
        found.append("pod: runAsNonRoot is not true")
    if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("pod: seccompProfile is not RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"pod: {key}")
    if pod.get("automountServiceAccountToken") is not False:
        found.append("pod: the service-account token is mounted")
    found += [f"volume {v['name']}: hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    for container in pod.get("initContainers", []) + pod["containers"]:
        name, sc = container["name"], container.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("runAsNonRoot") is False or sc.get("runAsUser") == 0:
            found.append(f"{name}: runs as root")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities not dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: the root filesystem is writable")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        limits = container.get("resources", {}).get("limits", {})
        for resource in ("cpu", "memory", "ephemeral-storage"):
            if resource not in limits:
                found.append(f"{name}: no {resource} limit")
    return found


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_pass_the_restricted_pod_security_standard(kind):
    assert restricted_violations(_pod_specs()[kind]) == []


def test_the_restricted_check_can_fail():
    pod = copy.deepcopy(_pod_specs()["Deployment"])
    del pod["securityContext"]["seccompProfile"]
    [container] = pod["containers"]
    container["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    del container["resources"]["limits"]["ephemeral-storage"]
    pod["automountServiceAccountToken"] = True
    found = restricted_violations(pod)
    assert len(found) == 5, found


def test_the_server_takes_its_key_from_a_secret_and_only_some_pods_reach_it():
    [container] = _pod_specs()["Deployment"]["containers"]
    [key] = [e for e in container["env"] if e["name"] == "LABKIT_API_KEY"]
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True  # no Secret: no key, as `labkit serve` without one
    [job_container] = _pod_specs()["Job"]["containers"]
    [job_key] = [e for e in job_container["env"] if e["name"] == "OPENAI_API_KEY"]
    assert job_key["valueFrom"]["secretKeyRef"]["name"] == ref["name"]

    policy = _one("NetworkPolicy")
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == []
    [rule] = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8000]
    job_labels = _one("Job")["spec"]["template"]["metadata"]["labels"]
    sources = rule["from"]
    assert any(s.get("podSelector", {}).get("matchLabels", {}).items() <= job_labels.items()
               and "namespaceSelector" not in s for s in sources)
    assert any("namespaceSelector" in s for s in sources), "Prometheus must scrape /metrics"


def test_time_slicing_config_is_the_device_plugins_format():
    config_map = next(d for d in _documents(K8S / "gpu-time-slicing.yaml")
                      if d["kind"] == "ConfigMap")
    [config_text] = config_map["data"].values()
    config = yaml.safe_load(config_text)
    assert config["version"] == "v1"
    resources = config["sharing"]["timeSlicing"]["resources"]
    assert resources == [{"name": "nvidia.com/gpu", "replicas": 4}]


def test_autoscaler_reads_the_queue_depth_through_prometheus_adapter():
    hpa = _one("HorizontalPodAutoscaler")
    deployment = _one("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    name = metric["external"]["metric"]["name"]
    selector = metric["external"]["metric"].get("selector", {}).get("matchLabels", {})
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    adapter = next(d for d in _documents(K8S / "prometheus-adapter-rules.yaml")
                   if d["kind"] == "ConfigMap")
    config = yaml.safe_load(adapter["data"]["config.yaml"])
    rules = [r for r in config["externalRules"] if r["name"]["as"] == name]
    assert len(rules) == 1, f"Prometheus Adapter has no external rule publishing {name}"
    assert "vllm:num_requests_waiting" in rules[0]["seriesQuery"]
    assert re.fullmatch(rules[0]["name"]["matches"], "vllm:num_requests_waiting")
    assert "<<.LabelMatchers>>" in rules[0]["metricsQuery"], "the HPA's selector must apply"


def test_keda_scaled_object_structure():
    """KEDA's ScaledObject is a custom resource: kubernetes-validate has no schema for it, so its
    structure is checked here against the fields KEDA's prometheus scaler needs."""
    [scaled] = _documents(K8S / "keda-scaledobject.yaml")
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert set(scaled) == {"apiVersion", "kind", "metadata", "spec"}
    spec = scaled["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                         "pollingInterval", "cooldownPeriod", "triggers", "advanced",
                         "fallback", "idleReplicaCount"}
    assert spec["scaleTargetRef"]["name"] == _one("Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert urlsplit(meta["serverAddress"]).scheme in ("http", "https")
    assert "vllm:num_requests_waiting" in meta["query"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
    assert float(meta["threshold"]) > 0


# --- Compose -------------------------------------------------------------------------------------

def _published(service: dict) -> set[int]:
    """Host ports: "8888:8888", "127.0.0.1:8000:8000" (short syntax) or {published: ...}."""
    ports = set()
    for entry in service["ports"]:
        if isinstance(entry, dict):
            ports.add(int(entry["published"]))
        else:
            parts = str(entry).split("/")[0].split(":")
            ports.add(int(parts[-2] if len(parts) > 1 else parts[0]))
    return ports


def test_compose_services_ports_gpu_and_volumes(compose):
    services = compose["services"]
    assert set(services) == {"lab", "server"}
    assert 8888 in _published(services["lab"])
    assert 8000 in _published(services["server"])
    assert compose["volumes"] is not None and "downloads" in compose["volumes"]
    for name, service in services.items():
        build = service["build"]
        context = build if isinstance(build, str) else build["context"]
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                           "Dockerfile")
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE, name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"]
                   and (d.get("count") in ("all", 1) or d.get("device_ids")) for d in devices), \
            f"{name} does not reserve the GPU"
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service["volumes"]}
        assert mounts.get("/lab/model") == "./model", name
        assert mounts.get("/lab/downloads") == "downloads", name
    assert services["lab"]["image"] == services["server"]["image"], "one image for both"


def test_compose_publishes_on_loopback_only_and_restarts_a_failed_server(compose):
    for name, service in compose["services"].items():
        for entry in service["ports"]:
            assert str(entry).startswith("127.0.0.1:"), f"{name} publishes {entry} beyond loopback"
    server = compose["services"]["server"]
    assert server["restart"] in ("unless-stopped", "on-failure", "always")
    assert "LABKIT_API_KEY" in server["environment"]  # passed through, never written here


def test_compose_lab_keeps_token_auth_on(compose):
    lab = compose["services"]["lab"]
    assert "command" not in lab, "the lab runs the image's CMD (token auth on)"
    environment = lab.get("environment", [])
    if isinstance(environment, dict):
        environment = [k if v is None else f"{k}={v}" for k, v in environment.items()]
    for entry in environment:
        assert not re.fullmatch(r"JUPYTER_TOKEN=\s*", entry), "an empty token turns auth off"


def test_compose_server_healthcheck_and_drain(compose):
    server = compose["services"]["server"]
    check = server["healthcheck"]["test"]
    text = check if isinstance(check, str) else " ".join(check)
    assert "http://127.0.0.1:8000/health" in text and "urllib" in text, "curl is not in the image"
    argv = _interpolate(server["command"], {})
    assert _seconds(server["stop_grace_period"]) > float(_flag(argv, "--drain-timeout"))


# --- entry points through labkit's argument parser -----------------------------------------------

def _labkit_entry_points() -> dict[str, list[str]]:
    compose = yaml.safe_load(COMPOSE.read_text())
    command = compose["services"]["server"]["command"]
    entry_points = {
        "compose server (defaults)": _interpolate(command, {}),
        "compose server (README's environment)": _interpolate(command, README_ENVIRONMENT),
    }
    for kind in ("Deployment", "Job"):
        for container in _one(kind)["spec"]["template"]["spec"]["containers"]:
            entry_points[f"{kind} {container['name']}"] = _container_argv(container)
    return entry_points


@pytest.mark.parametrize("where", list(_labkit_entry_points()))
def test_entry_point_parses_with_labkits_own_parser(where):
    argv = _labkit_entry_points()[where]
    args = _parse_labkit(argv)
    assert args.command == argv[1]
    if args.command == "serve":
        assert (args.host, args.port) == ("0.0.0.0", 8000), "reachable from outside the container"


def test_compose_defaults_and_readme_environment_are_substituted():
    points = _labkit_entry_points()
    defaults = _parse_labkit(points["compose server (defaults)"])
    assert (defaults.model, defaults.mode) == ("model", "sequential")
    readme = _parse_labkit(points["compose server (README's environment)"])
    assert (readme.model, readme.mode) == ("synthetic:llama-3.2-3b", "batched")
    text = (ROOT / "README.md").read_text()
    assert " ".join(f"{k}={v}" for k, v in README_ENVIRONMENT.items()) in text


def test_parser_check_can_fail(capsys):
    """Guards the entry-point test: a flag labkit does not have must be refused."""
    argv = _labkit_entry_points()["Deployment server"] + ["--no-such-flag"]
    with pytest.raises(SystemExit) as exc:
        _parse_labkit(argv)
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse_labkit(["labkit", "serve", "--mode", "no-such-mode"])
    with pytest.raises(SystemExit):  # an abbreviation of --drain-timeout
        _parse_labkit(["labkit", "serve", "--drain-time", "300"])


def test_dockerfile_cmd_is_jupyter_on_the_learners_workspace():
    """As `make lab`: the workspace synced from the committed notebooks, then JupyterLab on it
    (exec: tini's SIGTERM reaches JupyterLab, not the shell)."""
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)[1])
    assert cmd[:2] == ["sh", "-c"]
    sync, lab = cmd[2].split(" && ")
    assert sync.split()[:4] == ["python", "-m", "labkit.course.workspace", "sync"]
    folder = sync.split()[sync.split().index("--into") + 1]
    lab = lab.split()
    assert lab[:3] == ["exec", "jupyter", "lab"]
    assert lab[lab.index("--notebook-dir") + 1] == folder
    assert f"/lab/{folder}" in DOCKERFILE.read_text(), "the image must create the workspace"
    compose = yaml.safe_load(COMPOSE.read_text())
    assert f"workspace:/lab/{folder}" in compose["services"]["lab"]["volumes"]
    assert any((ROOT / "notebooks").glob("*.ipynb"))
    assert re.search(r'^ENTRYPOINT \["tini", "--"\]$', DOCKERFILE.read_text(), re.M), \
        "the entry points above assume the image's ENTRYPOINT is tini"
    assert "/lab/downloads" in DOCKERFILE.read_text(), \
        "the image must create /lab/downloads so compose's named volume is writable"
