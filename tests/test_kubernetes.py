"""deploy/kubernetes/ checked against the code, without a cluster.

The manifests are parsed and held to what farebox really does: the stages ``farebox up`` starts
(each with a Deployment, a PodDisruptionBudget and a KEDA ScaledObject), the CLI's parser, the
Settings fields, the provider registry's variables, the metrics port and the probe paths the
server answers, the queues each stage consumes, and how long a drain can take. The kustomizations
are read as kustomize would: every file they list exists and every manifest is listed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BASE = K8S / "base"
EXAMPLES = K8S / "examples"
PREFIX = "farebox-"  # Deployment name = PREFIX + the name `farebox up` gives the stage's process
# FAREBOX_* settings every worker must be given in a cluster: where the broker and Redis are, and metrics that
# the kubelet and Prometheus can reach.
REQUIRED = {"FAREBOX_AMQP_URL", "FAREBOX_REDIS_URL", "FAREBOX_METRICS_HOST", "FAREBOX_METRICS_PORT"}


# --- reading the files as kustomize does ---------------------------------------------------------
def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def kustomization(folder: Path) -> dict[str, Any]:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict) and data.get("kind") == "Kustomization", folder
    return data


def generator_files(k: dict[str, Any]) -> list[str]:
    return [f for gen in k.get("configMapGenerator", []) for f in gen.get("envs", [])]


def rendered(folder: Path) -> list[dict[str, Any]]:
    """The resources of a kustomization, recursing into the folders it lists (no patches are used)."""
    docs: list[dict[str, Any]] = []
    for entry in kustomization(folder)["resources"]:
        target = (folder / entry).resolve()
        docs += rendered(target) if target.is_dir() else load_all(target)
    return docs


def config_env(folder: Path) -> dict[str, str]:
    """farebox-config as the kustomization generates it (an overlay's ``behavior: merge`` adds to its base's)."""
    env: dict[str, str] = {}
    k = kustomization(folder)
    for entry in k["resources"]:
        if (folder / entry).is_dir():
            env |= config_env((folder / entry).resolve())
    for gen in k.get("configMapGenerator", []):
        assert gen["name"] == "farebox-config", "the workers read one ConfigMap"
        for f in gen.get("envs", []):
            env |= read_env_file(folder / f)
    return env


def secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in load_all(BASE / "secrets.example.yaml")}


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def worker_env(deployment: dict[str, Any], config: dict[str, str]) -> dict[str, str | None]:
    """Every variable the container gets, valued where the repository knows the value (ConfigMap), else None."""
    c, keys = container(deployment), secrets()
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "farebox-config"
            env |= config
        else:
            env |= dict.fromkeys(keys[source["secretRef"]["name"]])
    for var in c.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["key"] in keys[ref["name"]], f"{var['name']}: Secret {ref['name']} has no key {ref['key']}"
        env[var["name"]] = var.get("value")
    return env


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return rendered(BASE)


@pytest.fixture(scope="module")
def deployments(base: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return of_kind(base, "Deployment")


@pytest.fixture(scope="module")
def planned() -> dict[str, list[str]]:
    """What `farebox up` runs (the compose file is checked against the same): process name -> CLI arguments."""
    from farebox.settings import Settings
    from farebox.supervisor import plan_children

    children = plan_children(Settings(metrics_port=0), {}, scale={}, use_emulator=False)
    return {c.name: c.argv[c.argv.index("farebox") + 1 :] for c in children}


# --- the kustomizations ------------------------------------------------------------------------
@pytest.mark.parametrize("folder", [BASE, EXAMPLES], ids=lambda p: p.name)
def test_every_manifest_is_listed_and_every_listed_file_exists(folder: Path) -> None:
    k = kustomization(folder)
    listed = [*k["resources"], *generator_files(k)]
    for entry in listed:
        assert (folder / entry).exists(), f"{folder.name}/kustomization.yaml lists {entry}, which is not there"
    files = {p.name for p in folder.iterdir() if p.is_file() and p.name != "kustomization.yaml"}
    # The example Secrets stay out on purpose: applied with the rest, they would overwrite the real ones.
    unlisted = files - set(listed) - {"secrets.example.yaml"}
    assert not unlisted, f"{folder.name}: not in its kustomization.yaml: {sorted(unlisted)}"
    for entry in k["resources"]:
        if (folder / entry).is_file():
            assert load_all(folder / entry), f"{entry} holds no manifest"


def test_the_examples_build_on_the_base() -> None:
    assert "../base" in kustomization(EXAMPLES)["resources"]
    docs = rendered(EXAMPLES)
    (rabbit,) = of_kind(docs, "RabbitmqCluster").values()
    assert rabbit["apiVersion"] == "rabbitmq.com/v1beta1" and rabbit["spec"]["replicas"] == 3
    assert set(of_kind(docs, "Deployment")) >= set(of_kind(rendered(BASE), "Deployment"))


def test_names_are_unique(base: list[dict[str, Any]]) -> None:
    seen = [(d["kind"], d["metadata"]["name"]) for d in base]
    assert len(seen) == len(set(seen))


# --- stages, commands --------------------------------------------------------------------------
def test_every_stage_has_a_deployment_a_pdb_and_a_scaledobject(
    base: list[dict[str, Any]], planned: dict[str, list[str]]
) -> None:
    expected = {PREFIX + name for name in planned}
    for kind in ("Deployment", "PodDisruptionBudget", "ScaledObject"):
        assert set(of_kind(base, kind)) == expected, kind


def test_commands_are_what_farebox_up_runs_and_parse(
    deployments: dict[str, dict[str, Any]], planned: dict[str, list[str]]
) -> None:
    from farebox.cli import build_parser

    parser = build_parser()
    for name, deployment in deployments.items():
        c = container(deployment)
        assert "command" not in c, f"{name}: args only, the image's entrypoint is farebox"
        assert c["image"] == "farebox", name  # the kustomization's images: entry names the real one
        assert c["args"] == planned[name.removeprefix(PREFIX)], name
        assert parser.parse_args(c["args"]).command == "worker", name  # exits on an unknown flag or choice


def test_the_emulator_example_parses_and_is_where_the_workers_look(clean_env: pytest.MonkeyPatch) -> None:
    from farebox.cli import build_parser
    from farebox.cli.emulator import knobs_from_args

    docs = rendered(EXAMPLES)
    emulator = of_kind(docs, "Deployment")["farebox-emulator"]
    knobs = knobs_from_args(build_parser().parse_args(container(emulator)["args"]))
    assert knobs.host == "0.0.0.0"
    service = of_kind(docs, "Service")["farebox-emulator"]
    assert (
        config_env(EXAMPLES)["FAREBOX_EMULATOR_URL"] == f"http://farebox-emulator:{service['spec']['ports'][0]['port']}"
    )
    assert container(emulator)["ports"][0]["containerPort"] == knobs.port


# --- environment -------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", [BASE, EXAMPLES], ids=lambda p: p.name)
def test_environment_names_are_real_settings(folder: Path, clean_env: pytest.MonkeyPatch) -> None:
    from farebox.providers.registry import BUILTINS
    from farebox.settings import Settings

    fields = {f"FAREBOX_{name.upper()}" for name in Settings.model_fields}
    provider_vars = {b.key_env for b in BUILTINS} | {b.url_env for b in BUILTINS}
    config = config_env(folder)
    for name, deployment in of_kind(rendered(folder), "Deployment").items():
        if name == "farebox-emulator":
            continue
        env = worker_env(deployment, config)
        for var in env:
            if var.startswith("FAREBOX_"):
                assert var in fields, f"{name}: {var} is read by nothing"
            else:
                assert var in provider_vars, f"{name}: {var} is read by nothing"
        assert REQUIRED <= set(env), f"{name}: missing {sorted(REQUIRED - set(env))}"
    for var, value in config.items():
        clean_env.setenv(var, value)
    settings = Settings()  # every value the ConfigMap sets validates
    assert settings.metrics_host == "0.0.0.0", "probes and Prometheus come from outside the pod"


def test_provider_keys_come_from_the_secret_under_the_names_the_registry_reads(
    deployments: dict[str, dict[str, Any]], planned: dict[str, list[str]]
) -> None:
    from farebox.cli import build_parser
    from farebox.providers.registry import BUILTINS

    names = {b.name: {b.key_env, b.url_env} for b in BUILTINS}
    every = set().union(*names.values())
    assert set(secrets()["farebox-provider-keys"]) == every
    for name, deployment in deployments.items():
        given = set()
        for var in container(deployment).get("env", []):
            ref = var["valueFrom"]["secretKeyRef"]
            if ref["name"] != "farebox-provider-keys":
                assert var["name"].startswith("FAREBOX_"), f"{name}: {var['name']} from {ref['name']}"
                continue
            assert ref["name"] == "farebox-provider-keys" and ref["key"] == var["name"], name
            assert ref.get("optional") is True, f"{name}: a provider without a key must not stop the pod"
            given.add(var["name"])
        args = build_parser().parse_args(planned[name.removeprefix(PREFIX)])
        if args.stage == "execute":
            wanted = names[args.provider]  # one provider's key, no other
        elif args.stage in ("batch", "all"):
            wanted = every
        else:
            wanted = set()  # dedup, route, account never call a provider
        assert given == wanted, f"{name}: gets {sorted(given)}, needs {sorted(wanted)}"


# --- port, probes, drain -----------------------------------------------------------------------
def test_the_container_port_is_the_metrics_port_and_the_probes_are_served(
    deployments: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch
) -> None:
    from wsgiref.util import setup_testing_defaults

    from farebox import health, metrics
    from farebox.settings import Settings

    for var, value in config_env(BASE).items():
        clean_env.setenv(var, value)
    port = Settings().metrics_port
    assert port
    for name, deployment in deployments.items():
        c = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"metrics": port}, name
        assert c["readinessProbe"]["httpGet"] == {"path": health.READYZ, "port": "metrics"}, name
        assert c["livenessProbe"]["httpGet"] == {"path": health.LIVEZ, "port": "metrics"}, name
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), name
    # The server answers the probe paths itself (the metrics app would answer any path with 200 and metrics).
    app = health.with_probes(metrics.make_wsgi_app(metrics.REGISTRY))
    for path in (health.LIVEZ, health.READYZ):
        environ: dict[str, Any] = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        body = b"".join(app(environ, _ignore_start))  # type: ignore[arg-type]
        assert body.startswith((b"ok", b"not ")), f"{path} is not a probe of the server"


def _ignore_start(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
    pass


def test_the_grace_period_outlasts_the_longest_drain(deployments: dict[str, dict[str, Any]]) -> None:
    from farebox.stages.runtime import DRAIN_TIMEOUT_S

    # SIGTERM -> stop; wind_down (workers/main.py) waits DRAIN_TIMEOUT_S + 10 for the workers, then cancels them;
    # closing the connections, provider clients and Redis after that is allowed 5 s more.
    worst_s = DRAIN_TIMEOUT_S + 10 + 5
    for name, deployment in deployments.items():
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > worst_s, f"{name}: {grace}s would kill a drain that may take {worst_s:g}s"


def test_disruption_budgets_select_their_deployment(base: list[dict[str, Any]]) -> None:
    deployments = of_kind(base, "Deployment")
    for name, pdb in of_kind(base, "PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector == deployments[name]["spec"]["selector"]["matchLabels"], name
        assert pdb["spec"].get("maxUnavailable") == 1, f"{name}: a one-replica stage must stay drainable"
        # Readiness needs Redis: in a Redis outage no pod is ready, and a node drain must not wait for Redis.
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", name
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


# --- KEDA --------------------------------------------------------------------------------------
async def consumed_queues(args: list[str]) -> set[str]:
    """The queues the workers of ``farebox worker ARGS`` consume, built as ``run_stage`` builds them."""
    from farebox.cli import build_parser
    from farebox.routing.priority import LANES
    from farebox.routing.store import CatalogStore
    from farebox.settings import Settings
    from farebox.stages.main import Closable, make_redis, stage_cores, stages_of
    from farebox.stages.runtime import Worker

    parsed = build_parser().parse_args(args)
    settings = Settings()
    store = CatalogStore(settings.catalog, settings.policy)
    providers = store.current()[0].providers()
    redis = make_redis(settings)  # never connects: the cores are only built
    calls: list[Closable] = []
    queues: set[str] = set()
    try:
        for stage, provider in stages_of(parsed.stage, parsed.provider, settings):
            for core in stage_cores(settings, stage, provider, store, redis, calls):
                lanes = (parsed.lane,) if parsed.lane else LANES
                queues |= set(Worker(settings, core, providers, lanes=lanes).queues)
    finally:
        for c in calls:
            await c.aclose()
        await redis.aclose()
    return queues


async def test_scaledobjects_watch_exactly_the_queues_their_stage_consumes(
    base: list[dict[str, Any]], planned: dict[str, list[str]], clean_env: pytest.MonkeyPatch
) -> None:
    from farebox.routing.catalog import load_catalog
    from farebox.settings import Settings
    from farebox.stages.topology import queue_plan

    settings = Settings()  # the default namespace: the queue names a cluster has
    every_queue = set(queue_plan(settings, load_catalog(settings.catalog).providers()))
    deployments = of_kind(base, "Deployment")
    auths = of_kind(base, "TriggerAuthentication")
    for name, scaled in of_kind(base, "ScaledObject").items():
        assert scaled["spec"]["scaleTargetRef"]["name"] in deployments, name
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"], name
        (trigger,) = scaled["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "rabbitmq" and meta["mode"] == "QueueLength", name
        assert meta["protocol"] == "http", f"{name}: only the management API counts unacked messages (and regexes)"
        assert meta["useRegex"] == "true" and meta.get("operation", "sum") == "sum", name
        assert float(meta["value"]) > 0, name
        assert trigger["authenticationRef"]["name"] in auths, name
        pattern = meta["queueName"]
        assert pattern.startswith("^") and pattern.endswith("$"), f"{name}: RabbitMQ matches regexes anywhere"
        watched = {q for q in every_queue if re.search(pattern, q)}
        consumed = await consumed_queues(planned[name.removeprefix(PREFIX)])
        assert watched == consumed, f"{name}: watches {sorted(watched)}, consumes {sorted(consumed)}"


def test_the_trigger_authentication_reads_the_connections_secret(base: list[dict[str, Any]]) -> None:
    keys = secrets()
    for name, auth in of_kind(base, "TriggerAuthentication").items():
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert "host" in refs, name
        for secret, key in refs.values():
            assert key in keys[secret], f"{name}: {secret} has no key {key}"
        url = keys[refs["host"][0]][refs["host"][1]]
        assert url.startswith("http") and url.endswith("/"), "the management API URL, with the vhost / as a slash"
