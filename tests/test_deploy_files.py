"""The deploy files, checked statically (no Docker engine or cluster runs here): they parse, and
their ports, paths, config keys and metric names agree with each other and with the code."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import GatewayMiddleware, load_config
from gateway.cli import main
from gateway.config import IdempotencyConfig
from gateway.lifespan import SHUTDOWN_DRAIN_S
from gateway.server import build_app, uvicorn_options
from tests.asgi_helpers import CountingApp, client_for, run_lifespan
from tests.redis_process import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "gateway.example.toml"
CONFIG = DEPLOY / "gateway.toml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus.yml"
PROMETHEUS_K8S = DEPLOY / "prometheus-kubernetes.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])

# The series a dashboard may query: the metrics the gateway exports (CONTRACT "Operations"),
# counters with their `_total`, histograms through their buckets.
EXPORTED_SERIES = {
    "gateway_requests_total",
    "gateway_ratelimit_decisions_total",
    "gateway_concurrency_decisions_total",
    "gateway_concurrency_in_flight",
    "gateway_shed_total",
    "gateway_shed_admitting",
    "gateway_idempotency_outcomes_total",
    "gateway_store_latency_seconds_bucket",
    "gateway_upstream_latency_seconds_bucket",
    "gateway_added_latency_seconds_bucket",
    "gateway_upstream_errors_total",
    "gateway_store_errors_total",
    "gateway_store_breaker_state",
    "gateway_store_breaker_opened_total",
}
METRIC_NAME = re.compile(r"\bgateway_[a-z_]+\b")


# ---- readers ------------------------------------------------------------------------------

def yaml_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml_documents(path)
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def gateway_container() -> dict[str, Any]:
    containers = k8s_object("Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "gateway"]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def compose() -> dict[str, Any]:
    (doc,) = yaml_documents(COMPOSE)
    return dict(doc)


def configmap_toml() -> str:
    text: str = k8s_object("ConfigMap", "gateway-config")["data"]["gateway.toml"]
    return text


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, one list per stage, continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line.removesuffix("\\") + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def final_stage(instruction: str) -> list[str]:
    return [rest for name, rest in dockerfile_stages()[-1] if name == instruction]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), f"expected the exec (JSON array) form, got {text!r}"
    return [str(v) for v in value]


def dockerfile_port() -> int:
    (expose,) = final_stage("EXPOSE")
    return int(expose.split("/")[0])


def dockerfile_config_path() -> str:
    (cmd,) = final_stage("CMD")
    args = exec_form(cmd)
    return args[args.index("--config") + 1]


def healthcheck_command() -> list[str]:
    (healthcheck,) = final_stage("HEALTHCHECK")
    return exec_form(re.split(r"\bCMD\s+", healthcheck, maxsplit=1)[1])


def healthcheck_url() -> str:
    command = healthcheck_command()
    (url,) = re.findall(r"http://[^'\"\s]+", " ".join(command))
    return url


def option_pairs(args: list[str]) -> dict[str, str]:
    """``["redis-server", "--appendonly", "yes", ...]`` as ``{"appendonly": "yes", ...}``."""
    return {a[2:]: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and i + 1 < len(args)}


def dashboard() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return value


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def seconds(duration: str) -> float:
    """A compose duration such as ``60s`` or ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- the configs ----------------------------------------------------------------------------

def test_example_config_passes_check() -> None:
    """`gateway check deploy/gateway.example.toml` exits 0."""
    assert main(["check", str(EXAMPLE)]) == 0


def test_example_config_values() -> None:
    """The example's policies load in order with the documented meaning."""
    config = load_config(EXAMPLE, env={})
    assert [p.name for p in config.rate_limits] == ["per-client", "writes", "fleet"]
    per_client, writes, fleet = config.rate_limits
    assert (per_client.limit, per_client.period_ms, per_client.burst) == (100, 60_000, 20)
    assert writes.methods == frozenset({"POST", "PUT", "PATCH", "DELETE"})
    assert writes.paths == ("/v1",)
    assert (fleet.key, fleet.on_store_error, fleet.period_ms) == ("global", "deny", 1000)
    assert config.identity.trusted_proxies == ("10.0.0.0/8",)
    assert config.store.url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("source", ["deploy/gateway.toml", "deploy/k8s/configmap.yaml"])
def test_deploy_config_passes_check(source: str, tmp_path: Path) -> None:
    """The config the image, compose and the ConfigMap run passes `gateway check` and load_config."""
    path = CONFIG
    if source.endswith(".yaml"):
        path = tmp_path / "gateway.toml"
        path.write_text(configmap_toml())
    assert main(["check", str(path)]) == 0
    config = load_config(path, env={})
    assert (config.server.host, config.server.port, config.server.workers) == ("0.0.0.0", 8080, 1)
    assert config.store.url == "redis://redis:6379/0"
    assert [p.name for p in config.rate_limits] == ["per-client"]
    assert config.rate_limits[0].key == "identity"
    assert config.idempotency == IdempotencyConfig()


def test_configmap_embeds_deploy_config_verbatim() -> None:
    """deploy/k8s/configmap.yaml carries deploy/gateway.toml byte for byte, so the two cannot drift."""
    assert configmap_toml() == CONFIG.read_text()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    """Each YAML file under deploy/ parses into one or more mappings."""
    documents = yaml_documents(path)
    assert documents
    assert all(isinstance(doc, dict) for doc in documents)


def test_every_k8s_manifest_names_its_kind() -> None:
    """Every document in deploy/k8s is a Kubernetes object (`kubectl apply -f deploy/k8s/` takes them all)."""
    documents = [doc for path in sorted(K8S.glob("*")) for doc in yaml_documents(path)]
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= {
        doc["kind"] for doc in documents
    }
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert doc["metadata"]["name"]


# ---- the image --------------------------------------------------------------------------------

def test_dockerfile_builds_from_the_repo_root() -> None:
    """Every stage is python:3.11-slim; each file the build copies exists at the repo root and passes
    the Dockerfile's ignore file; the entrypoint is the package's console script."""
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build the wheel, then copy only the venv"
    assert all(stage[0][1].split()[0] == "python:3.11-slim" for stage in stages)
    ignore = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "the ignore file allows only what the build needs"
    copies = [rest.split() for stage in stages for name, rest in stage if name == "COPY"]
    local = [[a for a in args[:-1] if not a.startswith("--")] for args in copies
             if not any(a.startswith("--from=") for a in args)]
    assert local
    for sources in local:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository root"
            assert f"!{source}" in ignore, f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = final_stage("ENTRYPOINT")
    assert exec_form(entrypoint) == ["gateway"]
    assert "gateway" in scripts


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    """The image runs as uid 10001 and its HEALTHCHECK asks the exposed port's liveness path with
    Python (the slim image has no curl)."""
    (user,) = final_stage("USER")
    assert user.split(":")[0] == "10001"
    command = healthcheck_command()
    assert command[0] == "python"
    assert "urllib.request" in command[-1]
    url = urlsplit(healthcheck_url())
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", dockerfile_port(), "/_gateway/healthz")
    assert exec_form(final_stage("CMD")[0])[0] == "serve"


def test_dockerfile_agrees_with_the_deployment() -> None:
    """EXPOSE, the config's [server] port and the containerPort are one port; the CMD's config path is
    where the ConfigMap is mounted; the probes ask that port; the uid is the one the pod runs as."""
    container = gateway_container()
    pod = k8s_object("Deployment", "gateway")["spec"]["template"]["spec"]
    port = dockerfile_port()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert tomllib.loads(configmap_toml())["server"]["port"] == port
    assert container["args"] == exec_form(final_stage("CMD")[0])

    config_path = Path(dockerfile_config_path())
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "gateway-config"
    assert {"key": "gateway.toml", "path": config_path.name} in volume["configMap"]["items"]

    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/_gateway/readyz"
    assert live["path"] == urlsplit(healthcheck_url()).path == "/_gateway/healthz"
    assert container_port(container, ready["port"]) == container_port(container, live["port"]) == port

    (user,) = final_stage("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # a read-only root still needs a writable /tmp: the multiprocess metrics directory lives there
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def test_grace_periods_outlast_the_shutdown_drain() -> None:
    """The pod's and compose's grace periods exceed the preStop sleep plus the gateway's bounded
    drain (uvicorn's graceful timeout, then the idempotency settles), so SIGKILL never cuts it."""
    config = load_config(CONFIG, env={})
    drain_s = uvicorn_options(config)["timeout_graceful_shutdown"] + SHUTDOWN_DRAIN_S
    pod = k8s_object("Deployment", "gateway")["spec"]["template"]["spec"]
    pre_stop = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s
    assert seconds(compose()["services"]["gateway"]["stop_grace_period"]) > drain_s
    assert (final_stage("STOPSIGNAL") or ["SIGTERM"]) == ["SIGTERM"]


async def test_probe_paths_are_the_ones_the_gateway_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path a probe, the HEALTHCHECK or a scrape config asks answers 200 from the gateway
    itself, without reaching the app behind it."""
    for name in ("GATEWAY_STORE_URL", "GATEWAY_UPSTREAM_URL"):
        monkeypatch.delenv(name, raising=False)
    container = gateway_container()
    annotations = k8s_object("Deployment", "gateway")["spec"]["template"]["metadata"]["annotations"]
    scrape_paths = [job["metrics_path"] for path in (PROMETHEUS, PROMETHEUS_K8S)
                    for job in yaml_documents(path)[0]["scrape_configs"]]
    paths = {
        container["readinessProbe"]["httpGet"]["path"],
        container["livenessProbe"]["httpGet"]["path"],
        urlsplit(healthcheck_url()).path,
        annotations["prometheus.io/path"],
        *scrape_paths,
    }
    assert len(paths) == 3
    app = CountingApp()
    # the deploy config's [ops], asked from a pod address (kubelet, Prometheus: private networks)
    ops = load_config(CONFIG, env={}).ops
    gateway = GatewayMiddleware(app, config={"store": {"url": "memory://"},
                                             "ops": {"metrics_allow": list(ops.metrics_allow)}})
    statuses: dict[str, int] = {}

    async def probe() -> None:
        async with client_for(gateway, client_ip="10.42.0.7") as client:
            for path in sorted(paths):
                statuses[path] = (await client.get(path)).status_code

    await run_lifespan(gateway, probe)
    assert statuses == dict.fromkeys(paths, 200)
    assert app.calls == 0


# ---- metrics and dashboard -----------------------------------------------------------------------

def exported_series(text: str) -> dict[str, set[str]]:
    """The series names a Prometheus text exposition offers, each with the label names it carries."""
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names = [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
            else:
                names = [name if kind != "counter" or name.endswith("_total") else f"{name}_total"]
            for n in names:
                series.setdefault(n, set())
        elif line and not line.startswith("#"):
            sample = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
            assert sample is not None, line
            series.setdefault(sample[1], set()).update(re.findall(r'([a-zA-Z_]\w*)="', sample[2] or ""))
    return series


def query_labels(expr: str) -> set[str]:
    """The label names a PromQL expression groups by or selects on."""
    grouped = {lb.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
               for lb in group.split(",") if lb.strip()}
    selected = {name for selector in re.findall(r"\{([^}]*)\}", expr)
                for name in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", selector)}
    return grouped | selected


def test_dashboard_shape() -> None:
    """The dashboard parses; every panel has a Prometheus datasource (the dashboard's datasource
    variable) and at least one target with a query."""
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 8
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]


def test_dashboard_charts_every_exported_metric() -> None:
    """The dashboard queries each metric the gateway exports, and nothing else named gateway_*."""
    used = {name for expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    assert used == EXPORTED_SERIES


async def test_dashboard_queries_only_what_the_gateway_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every metric and label a dashboard query names is in /_gateway/metrics of the `gateway serve`
    app after an allowed, a denied and a keyed request to an unreachable upstream."""
    for name in ("GATEWAY_STORE_URL", "GATEWAY_UPSTREAM_URL"):
        monkeypatch.delenv(name, raising=False)
    config = load_config({
        "upstream": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": "1s"},
        "store": {"url": "memory://"},
        "rate_limit": [{"name": "per-client", "limit": 1, "period": "1m", "paths": ["/limited"]}],
        "concurrency_limit": [{"name": "in-flight", "limit": 5, "paths": ["/limited"]}],
        "shedding": {"local": {"enabled": True}, "fleet": {"enabled": True}},
        "ops": {"metrics_allow": ["0.0.0.0/0"]},  # the test's client scrapes from afar
    }, env={})
    app = build_app(config)
    seen: dict[str, Any] = {}

    async def exercise() -> None:
        async with client_for(app) as client:
            seen["allowed"] = (await client.get("/limited")).status_code
            seen["denied"] = (await client.get("/limited")).status_code
            seen["keyed"] = (await client.post("/charges", content=b"{}",
                                               headers={"Idempotency-Key": "k1"})).status_code
            response = await client.get("/_gateway/metrics")
            seen["metrics"] = (response.status_code, response.headers["content-type"], response.text)

    await run_lifespan(app, exercise)
    assert (seen["allowed"], seen["denied"], seen["keyed"]) == (502, 429, 502)
    status, content_type, text = seen["metrics"]
    assert (status, content_type.split(";")[0]) == (200, "text/plain")
    series = exported_series(text)
    for expr in dashboard_queries():
        names = METRIC_NAME.findall(expr)
        missing = [n for n in names if n not in series]
        assert not missing, f"{expr}: {missing} not exported"
        labels = set().union(*(series[n] for n in names))
        assert query_labels(expr) <= labels, f"{expr}: labels {query_labels(expr) - labels} not exported"


# ---- Prometheus -------------------------------------------------------------------------------------

def test_compose_scrape_config_reaches_the_gateway() -> None:
    """deploy/prometheus.yml scrapes /_gateway/metrics at the compose gateway service's port."""
    (doc,) = yaml_documents(PROMETHEUS)
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "gateway"]
    assert job["metrics_path"] == "/_gateway/metrics"
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, _, port = target.rpartition(":")
    assert host in compose()["services"]
    assert host == "gateway"
    assert int(port) == load_config(CONFIG, env={}).server.port == dockerfile_port()


def test_kubernetes_scrape_config_matches_the_pod_annotations() -> None:
    """deploy/prometheus-kubernetes.yml keeps the gateway pods, and their annotations name the
    metrics path and the container port."""
    (doc,) = yaml_documents(PROMETHEUS_K8S)
    (job,) = doc["scrape_configs"]
    assert job["metrics_path"] == "/_gateway/metrics"
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    template = k8s_object("Deployment", "gateway")["spec"]["template"]
    label = template["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == label
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == job["metrics_path"]
    assert int(annotations["prometheus.io/port"]) == dockerfile_port()


# ---- compose -----------------------------------------------------------------------------------------

def test_compose_gateway_service_uses_the_image_and_port() -> None:
    """The compose gateway builds deploy/Dockerfile from the repo root, publishes its port, mounts
    deploy/gateway.toml where the CMD reads it, and waits for a healthy Redis."""
    services = compose()["services"]
    gateway = services["gateway"]
    build = gateway["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    published = [str(p).rpartition(":")[2] for p in gateway["ports"]]
    assert published == [str(dockerfile_port())]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in gateway["volumes"]}
    assert mounts[dockerfile_config_path()] == CONFIG
    assert gateway["read_only"] is True
    assert "/tmp" in gateway["tmpfs"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"


def test_compose_mounts_existing_files() -> None:
    """Every file compose mounts into a container exists under deploy/, and Grafana's dashboard
    provider reads the folder the dashboard is mounted in."""
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    dashboard_dir = Path(grafana_mounts["./grafana/gateway-dashboard.json"]).parent
    (provider,) = yaml_documents(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gateway.yml")
    assert provider["providers"][0]["options"]["path"] == str(dashboard_dir)
    (datasources,) = yaml_documents(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    url = urlsplit(datasources["datasources"][0]["url"])
    assert url.hostname in services
    assert f"{url.port}:{url.port}" in services["prometheus"]["ports"]


def test_config_urls_name_the_deployed_services() -> None:
    """The config's store and upstream URLs name the Redis and upstream that compose and deploy/k8s
    run, at the ports they listen on."""
    config = load_config(CONFIG, env={})
    store, upstream = urlsplit(config.store.url), urlsplit(config.upstream.url)
    services = compose()["services"]
    assert store.hostname in services
    assert upstream.hostname in services
    assert store.port == 6379  # the redis image's port
    assert option_pairs(services[str(upstream.hostname)]["command"])["port"] == str(upstream.port)
    redis_service = k8s_object("Service", str(store.hostname))
    upstream_service = k8s_object("Service", str(upstream.hostname))
    assert [p["port"] for p in redis_service["spec"]["ports"]] == [store.port]
    assert [p["port"] for p in upstream_service["spec"]["ports"]] == [upstream.port]
    upstream_pod = k8s_object("Deployment", str(upstream.hostname))["spec"]["template"]["spec"]
    assert option_pairs(upstream_pod["containers"][0]["args"])["port"] == str(upstream.port)


# ---- kubernetes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Service", "PodDisruptionBudget"])
def test_selectors_pick_the_gateway_pods(kind: str) -> None:
    """The Service and the PodDisruptionBudget select the gateway Deployment's pods."""
    deployment = k8s_object("Deployment", "gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = k8s_object(kind, "gateway")["spec"]
    selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
    assert selector
    assert selector.items() <= pod_labels.items()


def test_service_targets_the_container_port() -> None:
    """The Service sends its traffic to the gateway container's port."""
    (port,) = k8s_object("Service", "gateway")["spec"]["ports"]
    assert container_port(gateway_container(), port["targetPort"]) == dockerfile_port()


def test_hpa_scales_the_deployment_on_cpu() -> None:
    """The HPA scales Deployment/gateway on CPU (which the container requests), never below the
    PodDisruptionBudget's floor plus one."""
    hpa = k8s_object("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert (metric["type"], metric["resource"]["name"]) == ("Resource", "cpu")
    assert gateway_container()["resources"]["requests"]["cpu"]
    pdb = k8s_object("PodDisruptionBudget", "gateway")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert k8s_object("Deployment", "gateway")["spec"]["replicas"] >= hpa["spec"]["minReplicas"]


# ---- the store ----------------------------------------------------------------------------------------

def redis_options(where: str) -> dict[str, str]:
    if where == "compose":
        command = compose()["services"]["redis"]["command"]
        assert command[0] == "redis-server"
        return option_pairs(command)
    (container,) = k8s_object("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    return option_pairs(container["args"])


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_redis_is_durable(where: str) -> None:
    """The deployed Redis keeps idempotency records: AOF fsynced every second or always, no eviction,
    its data directory on a volume."""
    options = redis_options(where)
    assert options["appendonly"] == "yes"
    assert options["appendfsync"] in {"everysec", "always"}
    assert options["maxmemory-policy"] == "noeviction"
    if where == "compose":
        volumes = [v.split(":") for v in compose()["services"]["redis"]["volumes"]]
        assert [name for name, target in volumes if target == "/data"] == ["redis-data"]
        assert "redis-data" in compose()["volumes"]
    else:
        spec = k8s_object("StatefulSet", "redis")["spec"]
        (claim,) = spec["volumeClaimTemplates"]
        (container,) = spec["template"]["spec"]["containers"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


# ---- the README ----------------------------------------------------------------------------------------

def test_readme_names_every_deploy_file() -> None:
    """deploy/README.md mentions each file under deploy/ and says the files are only checked statically."""
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md":
            name = str(path.relative_to(DEPLOY))
            assert f"`{name}`" in readme, f"deploy/README.md does not mention {name}"
    assert "No Docker engine" in readme
