"""deploy/kubernetes: kustomize renders both overlays, every object validates against the Kubernetes
schemas, and the manifests agree with `medgemma-triton`'s own argument parser, the server's shutdown
bounds, the Dockerfiles and docs/kubernetes.md. Offline and fast (no cluster, no image build).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medgemma_triton import contract
from medgemma_triton.cli import build_parser
from medgemma_triton.gpu import pins

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # the schemas the objects must validate against (docs/kubernetes.md)
KUBECTL = shutil.which("kubectl")
CRD_API_GROUPS = ("monitoring.coreos.com/",)  # not in the core schemas: checked by check_pod_monitor


@functools.cache
def _kustomize(overlay: str) -> str:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(KUBE / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    return [doc for doc in yaml.safe_load_all(_kustomize(overlay)) if doc]


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str) -> dict:
    found = objects(overlay, kind)
    assert len(found) == 1, f"overlays/{overlay}: expected one {kind}, found {len(found)}"
    return found[0]


def server_container(overlay: str) -> dict:
    containers = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the serving pod runs one container (serve supervises Triton and the gateway)"
    return containers[0]


def build_container(overlay: str) -> dict:
    containers = one(overlay, "Job")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def parse(container: dict, command: str):
    """The container's arguments as `medgemma-triton` parses them (the image's entrypoint is the CLI)."""
    assert "command" not in container, "the image's entrypoint (medgemma-triton) must run, not a replacement"
    argv = [str(a) for a in container["args"]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports on stderr and exits
        pytest.fail(f"`medgemma-triton {' '.join(argv)}` does not parse (exit {exc.code})")
    assert args.command == command
    return args


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    ports = container_ports(container)
    assert port in ports, f"port {port!r} is not a named containerPort of {container['name']}"
    return ports[port]


def mounts(pod_spec: dict, container: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container.get("volumeMounts", [])}


def volume_of(pod_spec: dict, container: dict, path: str) -> tuple[str, dict, dict]:
    """The mount holding `path`: (mountPath, volumeMount, volume), the deepest one."""
    candidates = [mp for mp in mounts(pod_spec, container) if path == mp or path.startswith(mp.rstrip("/") + "/")]
    assert candidates, f"{path} is on no volume of {container['name']}"
    mount_path = max(candidates, key=len)
    mount, volume = mounts(pod_spec, container)[mount_path]
    return mount_path, mount, volume


def pod_specs(overlay: str) -> list[tuple[str, dict]]:
    return [(o["kind"], o["spec"]["template"]["spec"]) for o in render(overlay) if o["kind"] in ("Deployment", "Job")]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_for(overlay: str) -> Path:
    return REPO / "Dockerfile" if overlay == "cpu" else REPO / "deploy" / "gpu.Dockerfile"


# --- rendering and schemas ---------------------------------------------------------------------------------

EXPECTED_KINDS = {
    "cpu": ["Deployment", "HorizontalPodAutoscaler", "Job", "Namespace", "PersistentVolumeClaim",
            "PersistentVolumeClaim", "PodDisruptionBudget", "PodMonitor", "Service"],
    "gpu": ["Deployment", "HorizontalPodAutoscaler", "Job", "Namespace", "PersistentVolumeClaim",
            "PersistentVolumeClaim", "PodDisruptionBudget", "PodMonitor", "Service"],
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    rendered = render(overlay)
    assert sorted(o["kind"] for o in rendered) == EXPECTED_KINDS[overlay]
    namespace = one(overlay, "Namespace")["metadata"]["name"]
    for o in rendered:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == namespace, f"{o['kind']} {o['metadata']['name']}"


def check_pod_monitor(obj: dict) -> None:
    """A minimal structural check of a monitoring.coreos.com/v1 PodMonitor (a CRD: no core schema)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PodMonitor"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
    assert isinstance(obj["metadata"].get("name"), str) and obj["metadata"]["name"]
    spec = obj["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                         "sampleLimit", "targetLimit"}, sorted(spec)
    labels = spec["selector"]["matchLabels"]
    assert labels and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    endpoints = spec["podMetricsEndpoints"]
    assert isinstance(endpoints, list) and endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= {"port", "portNumber", "path", "interval", "scrapeTimeout", "scheme",
                                 "honorLabels", "relabelings", "metricRelabelings"}, sorted(endpoint)
        assert isinstance(endpoint.get("port"), str) or isinstance(endpoint.get("portNumber"), int)
        assert endpoint.get("path", "/metrics").startswith("/")
        if "interval" in endpoint:
            assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint["interval"]), endpoint["interval"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(overlay):
    import kubernetes_validate

    for obj in render(overlay):
        if obj["apiVersion"].startswith(CRD_API_GROUPS):
            check_pod_monitor(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_schema_validation_catches_a_mistake():
    """The validator really checks (strict: unknown fields fail), so the test above means something."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(one("cpu", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    monitor = json.loads(json.dumps(one("cpu", "PodMonitor")))
    del monitor["spec"]["podMetricsEndpoints"]
    with pytest.raises(KeyError):
        check_pod_monitor(monitor)


# --- the serving container against `medgemma-triton serve` -------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_arguments_parse_and_match_the_container_ports(overlay):
    container = server_container(overlay)
    args = parse(container, "serve")
    assert args.host == "0.0.0.0", "Triton must listen beyond loopback for probes and the Service"
    expected = {"grpc": args.grpc_port, "http": args.http_port, "metrics": args.metrics_port}
    if args.openai_port is not None:
        expected["openai"] = args.openai_port
    assert container_ports(container) == expected
    assert (args.openai_port is not None) == (overlay == "cpu"), "the gateway runs on the cpu overlay only"
    if args.openai_port is not None:
        env = {e["name"]: e for e in container.get("env", [])}
        from medgemma_triton.gateway.config import API_KEY_ENV

        assert "secretKeyRef" in env[API_KEY_ENV]["valueFrom"], "the gateway's API key comes from a Secret"
        assert not env[API_KEY_ENV]["valueFrom"]["secretKeyRef"].get("optional", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_http_port_and_outlast_serve_ready_timeout(overlay):
    container = server_container(overlay)
    args = parse(container, "serve")
    probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
    for name, probe in probes.items():
        assert probe["httpGet"]["path"] == paths[name]
        port = resolve_port(container, probe["httpGet"]["port"])
        assert port == args.http_port, f"{name} probes port {port}, serve's --http-port is {args.http_port}"
        assert port in container_ports(container).values()
    startup = probes["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget > args.ready_timeout, (
        f"the startupProbe gives up after {budget} s, before serve's own --ready-timeout {args.ready_timeout:g} s"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_targets_container_ports(overlay):
    container = server_container(overlay)
    service = one(overlay, "Service")
    named = container_ports(container)
    assert {p["name"] for p in service["spec"]["ports"]} == set(named)
    for port in service["spec"]["ports"]:
        target = resolve_port(container, port.get("targetPort", port["port"]))
        assert target == named[port["name"]] == port["port"], port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_the_serving_pods(overlay):
    deployment = one(overlay, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one(overlay, "Service")["spec"]["selector"],
        "PodMonitor": one(overlay, "PodMonitor")["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), f"{kind} selector {selector} misses the pods {pod_labels}"
    job_labels = one(overlay, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not selectors["Service"].items() <= job_labels.items(), "the build pod must not receive traffic"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_monitor_scrapes_the_metrics_port(overlay):
    container = server_container(overlay)
    args = parse(container, "serve")
    (endpoint,) = one(overlay, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert resolve_port(container, endpoint["port"]) == args.metrics_port
    assert endpoint.get("path", "/metrics") == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_serve_shutdown(overlay):
    """SIGTERM -> serve drains Triton and the gateway together, then unloads every model (TritonServer.stop,
    bounded by its stop_timeout_s for the pod's --drain-timeout), then waits for the gateway (5 s)."""
    from medgemma_triton.server.launcher import TritonServer

    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    container = server_container(overlay)
    args = parse(container, "serve")
    triton_stop = TritonServer(Path("repository"), drain_timeout_s=args.drain_timeout).stop_timeout_s
    gateway_stop = 5 if args.openai_port is not None else 0
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + triton_stop + gateway_stop + 5, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + Triton {triton_stop} + gateway {gateway_stop} + 5"
    )
    assert grace <= 120, "a grace period far past serve's bounds only delays rollouts"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_and_tmp(overlay):
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    container = server_container(overlay)
    _, _, shm = volume_of(pod, container, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"].get("sizeLimit")
    for _, spec in pod_specs(overlay):
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["securityContext"].get("readOnlyRootFilesystem") and c["name"] != "wait-for-repository":
                mount_path, mount, volume = volume_of(spec, c, "/tmp")
                assert mount_path == "/tmp" and "emptyDir" in volume and not mount.get("readOnly")
                assert volume["emptyDir"].get("sizeLimit")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_with_a_restricted_security_context(overlay):
    uid = None
    for keyword, rest in dockerfile_instructions(dockerfile_for(overlay)):
        if keyword == "USER":
            uid = int(rest.split(":")[0])
    assert uid and uid != 0
    for kind, spec in pod_specs(overlay):
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (kind, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], (kind, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (kind, c["name"])
            resources = c["resources"]
            for key in ("cpu", "memory"):
                assert key in resources["requests"] and key in resources["limits"], (kind, c["name"], key)


# --- the build Job against `medgemma-triton build` ----------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_build_job_arguments_parse_and_feed_the_server(overlay):
    from medgemma_triton.repository.gpu import PRECISIONS as GPU_PRECISIONS
    from medgemma_triton.repository.cpu import CPU_PRECISIONS

    job_pod = one(overlay, "Job")["spec"]["template"]["spec"]
    build = build_container(overlay)
    args = parse(build, "build")
    assert args.profile == overlay
    assert args.precision in {"cpu": CPU_PRECISIONS, "gpu": GPU_PRECISIONS}[overlay]
    assert args.cache_dir, "--cache-dir on the volume keeps exports between builds"

    # Output and cache on the same writable volume (the repository hard-links the exports).
    _, out_mount, out_volume = volume_of(job_pod, build, args.output)
    _, cache_mount, cache_volume = volume_of(job_pod, build, args.cache_dir)
    assert out_volume == cache_volume and not out_mount.get("readOnly")
    models_claim = out_volume["persistentVolumeClaim"]["claimName"]
    assert not Path(args.cache_dir).is_relative_to(args.output) and not Path(args.output).is_relative_to(args.cache_dir)
    # The checkpoint: mounted read-only from its own claim.
    _, ckpt_mount, ckpt_volume = volume_of(job_pod, build, args.checkpoint)
    assert ckpt_mount.get("readOnly") and ckpt_volume["persistentVolumeClaim"]["claimName"] != models_claim

    # The server reads what the build wrote, from the same claim, read-only, at the same path.
    server_pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    server = server_container(overlay)
    serve = parse(server, "serve")
    assert serve.repository == args.output
    _, mount, volume = volume_of(server_pod, server, serve.repository)
    assert mount.get("readOnly") and volume["persistentVolumeClaim"]["claimName"] == models_claim
    assert volume["persistentVolumeClaim"].get("readOnly")
    claims = {o["metadata"]["name"]: o for o in objects(overlay, "PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims[models_claim]["spec"]["accessModes"], "several serving pods, several nodes"

    # The init container waits for the file that appears when the build has put the repository in place.
    (wait,) = server_pod["initContainers"]
    assert f"{serve.repository}/{contract.TOP_MODEL}/config.pbtxt" in " ".join(wait["command"])
    assert wait["image"] == server["image"]


# --- the gpu overlay ----------------------------------------------------------------------------------------

def test_gpu_overlay_runs_the_pinned_container_with_one_gpu():
    froms = [rest for keyword, rest in dockerfile_instructions(dockerfile_for("gpu")) if keyword == "FROM"]
    assert froms == [pins.CONTAINER_TAG]
    assert pins.CONTAINER_TAG in (REPO / "docs" / "gpu.md").read_text()
    release = pins.CONTAINER_TAG.split(":")[1].split("-")[0]  # 26.07
    for container in (server_container("gpu"), build_container("gpu")):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith(f"-trtllm-{release}"), container["image"]
    for container in (server_container("cpu"), build_container("cpu")):
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    for _, spec in pod_specs("gpu"):
        assert spec["nodeSelector"] and spec["tolerations"], "documented placeholders for GPU nodes"
    for overlay in OVERLAYS:
        assert "replicas" not in one(overlay, "Deployment")["spec"], f"the HPA owns overlays/{overlay}' replica count"
    gpu_hpa = one("gpu", "HorizontalPodAutoscaler")["spec"]
    assert 1 <= gpu_hpa["minReplicas"] <= gpu_hpa["maxReplicas"]
    assert gpu_hpa["maxReplicas"] <= one("cpu", "HorizontalPodAutoscaler")["spec"]["maxReplicas"], "one GPU per pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_per_overlay(overlay):
    images = {c["image"] for _, spec in pod_specs(overlay) for c in spec.get("initContainers", []) + spec["containers"]}
    assert len(images) == 1, images
    other = {c["image"] for _, spec in pod_specs("gpu" if overlay == "cpu" else "cpu") for c in spec["containers"]}
    assert images.isdisjoint(other)


# --- the scaling signal: HPA, prometheus-adapter rule and docs/kubernetes.md agree ----------------------------

def documented_target() -> tuple[float, str]:
    text = (REPO / "docs" / "kubernetes.md").read_text()
    section = re.search(r"^## Scaling signal\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "docs/kubernetes.md has no '## Scaling signal' section"
    found = re.findall(r"^target: (\d+(?:\.\d+)?) queued requests per pod$", section.group(1), re.M)
    assert len(found) == 1, "the section states the target once, as `target: N queued requests per pod`"
    return float(found[0]), section.group(1)


def adapter_rule() -> dict:
    values = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_adapter_rule_and_docs_agree(overlay):
    """Both overlays scale on the llm's queue gauge: the cpu llm's scheduler sets it, the gpu llm sets it from
    TensorRT-LLM's iteration statistics (tests/test_gpu_profile.py::test_queue_gauge_follows_tensorrt_llm_queue)."""
    target, section = documented_target()
    hpa = one(overlay, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) == target
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(overlay, "Deployment")["metadata"]["name"]

    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["name"]["as"] in section
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    source_metric, matchers = series.group(1), series.group(2)
    assert re.search(rule["name"]["matches"], source_metric)
    assert f'model="{contract.LLM_MODEL}"' in matchers and f'model="{contract.LLM_MODEL}"' in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    # The gauge the llm model sets, by this name (the cpu profile's Triton custom metrics).
    triton_io = (REPO / "medgemma_triton" / "serving" / "triton_io.py").read_text()
    assert f'name="{source_metric}"' in triton_io
    assert source_metric in section

    # Above zero, and well below what one pod holds: the cpu llm's refusal limit; for the gpu llm, which
    # refuses nothing (TensorRT-LLM queues), a pod's worth of TensorRT-LLM slots.
    if overlay == "cpu":
        env = {e["name"]: e.get("value") for e in server_container(overlay).get("env", [])}
        from medgemma_triton.runtime.limits import Limits

        one_pod = int(env.get(Limits.env_name("max_queued"), Limits().max_queued))
    else:
        from medgemma_triton.gpu.llm_engine import EngineSettings

        one_pod = EngineSettings().max_batch_size
    assert 0 < target < one_pod / 4


# --- images -------------------------------------------------------------------------------------------------

def test_cpu_dockerfile():
    instructions = dockerfile_instructions(REPO / "Dockerfile")
    builder, base = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert builder.startswith("python:3.11-slim") and builder.endswith(" AS llamacpp")
    assert base.startswith("python:3.11-slim")
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    # llama.cpp (int4/int8): built by our one build, every CPU variant, and its wheel installed in the image
    assert any("python -m medgemma_triton.export.llamacpp_build" in r for r in runs)
    assert any("pip install --no-deps /wheels/" in r for r in runs)
    assert ("COPY", "--from=llamacpp /wheels /wheels") in instructions
    torch_run = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_run = next(i for i, r in enumerate(runs) if '".[export,cpu,client,gateway]"' in r)
    assert torch_run < package_run
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_run]
    if tomllib is not None:
        project = tomllib.loads((REPO / "pyproject.toml").read_text())
        torch_pin = next(r for r in project["project"]["optional-dependencies"]["export"] if r.startswith("torch"))
        assert re.search(re.escape(torch_pin.replace(" ", "")) + r"(\s|$)", runs[torch_run]), torch_pin
    (entrypoint,) = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["medgemma-triton"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/gpu.Dockerfile"])
def test_dockerfiles_copy_what_the_package_needs(dockerfile):
    instructions = dockerfile_instructions(REPO / dockerfile)
    copies = [rest for keyword, rest in instructions if keyword == "COPY" and not rest.startswith("--from=")]
    copied = {rest.split()[0] for rest in copies} | {name for rest in copies for name in rest.split()[:-1]}
    needed = {"pyproject.toml", "README.md", "medgemma_triton"}
    if tomllib is not None:
        project = tomllib.loads((REPO / "pyproject.toml").read_text())
        needed |= set(project["tool"]["setuptools"]["package-dir"].values())
    assert needed <= copied, needed - copied
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied <= allowed, f".dockerignore leaves out {copied - allowed}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    (entrypoint,) = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint[-1] == "medgemma-triton"


def test_kubernetes_validate_is_pinned_in_the_test_extra():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    (pin,) = [r for r in project["project"]["optional-dependencies"]["test"] if r.startswith("kubernetes-validate")]
    assert pin == f"kubernetes-validate=={importlib.metadata.version('kubernetes-validate')}"
