"""docker-compose.yml, the Dockerfile and deploy/ checked against the code, without Docker.

No engine runs in CI, so these tests parse the files and hold them to what farebox really
accepts: the argparse parser, the Settings fields, the emulator knobs, the provider registry,
the stages ``farebox up`` would start and the metrics the processes register.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"

METRICS_PORT = 9464
EMULATOR_PORT = 8099
INFRA = {"rabbitmq", "redis", "prometheus", "grafana"}


# --- helpers -----------------------------------------------------------------------------------
_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution (enough of it): ${X}, ${X:-d}, ${X-d}, ${X:?e}, $X, $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        have = env.get(name)
        if op == ":-":
            return have if have else arg
        if op == "-":
            return arg if have is None else have
        if op in (":?", "?"):
            if not have:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return have
        if op in (":+", "+"):
            return arg if have else ""
        return have or ""

    return _VAR.sub(sub, value)


def env_of(service: Mapping[str, Any], host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {k: interpolate("" if v is None else str(v), host_env or {}) for k, v in raw.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def container_ports(service: Mapping[str, Any]) -> set[int]:
    """Container side of every published port (short or long syntax)."""
    ports: set[int] = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def farebox_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services that run the farebox image (the emulator and every stage)."""
    return {name: s for name, s in services.items() if s.get("build") is not None}


@pytest.fixture(scope="module")
def workers(farebox_services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in farebox_services.items() if command_of(s)[:1] == ["worker"]}


@pytest.fixture(scope="module")
def registered_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """Every series name the processes can export, and the label names of farebox's own."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    from farebox import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in suffixes[family.type])
    labels: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            family = obj.describe()[0]
            for s in suffixes[family.type]:
                labels[family.name + s] = set(obj._labelnames) | ({"le"} if s == "_bucket" else set())
    return names, labels


# --- compose: services, images, commands ---------------------------------------------------------
def test_infrastructure_images_and_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["redis"]["image"].split(":")[1].startswith("7")
    assert services["prometheus"]["image"].split(":")[0] == "prom/prometheus"
    assert services["grafana"]["image"].split(":")[0] == "grafana/grafana"

    rabbit_check = services["rabbitmq"]["healthcheck"]["test"]
    assert "rabbitmq-diagnostics" in rabbit_check and "ping" in rabbit_check
    redis_check = services["redis"]["healthcheck"]["test"]
    assert "redis-cli" in redis_check and "ping" in redis_check


def test_redis_persists(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    cmd = command_of(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    data_mounts = [v for v in redis.get("volumes", []) if str(v).split(":")[1:2] == ["/data"]]
    assert data_mounts, "Redis /data is not on a volume"
    assert str(data_mounts[0]).split(":")[0] in (compose.get("volumes") or {}), "use a named volume"


def test_every_farebox_service_runs_the_built_image(farebox_services: dict[str, dict[str, Any]]) -> None:
    assert farebox_services, "no service builds the farebox image"
    for name, s in farebox_services.items():
        build = s["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").resolve() == DOCKERFILE.resolve(), name
    images = {s.get("image") for s in farebox_services.values()}
    assert len(images) == 1, f"farebox services should share one image tag, got {images}"


def test_commands_parse_with_the_real_cli(farebox_services: dict[str, dict[str, Any]]) -> None:
    from farebox.cli import build_parser

    parser = build_parser()
    for name, s in farebox_services.items():
        args = parser.parse_args(command_of(s))  # exits (fails the test) on an unknown flag or choice
        assert args.command in {"worker", "emulator"}, name


def test_emulator_service(services: dict[str, dict[str, Any]]) -> None:
    from farebox.cli import build_parser
    from farebox.cli.emulator import knobs_from_args

    emu = services["emulator"]
    knobs = knobs_from_args(build_parser().parse_args(command_of(emu)))
    assert knobs.port == EMULATOR_PORT
    assert knobs.host == "0.0.0.0", "the emulator must listen on every interface to be reachable"
    assert str(EMULATOR_PORT) in " ".join(emu["healthcheck"]["test"])


def test_execute_providers_are_known(workers: dict[str, dict[str, Any]]) -> None:
    from farebox.cli import build_parser
    from farebox.providers.registry import provider_configs

    known = set(provider_configs({}, emulator_url="http://x"))
    served = set()
    for name, s in workers.items():
        args = build_parser().parse_args(command_of(s))
        if args.stage == "execute":
            assert args.provider in known, f"{name}: unknown provider {args.provider!r}"
            served.add(args.provider)
        else:
            assert args.provider is None, f"{name}: --provider only goes with execute"
    assert served == known, f"providers without an execute worker: {sorted(known - served)}"


def test_stages_match_farebox_up(farebox_services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch) -> None:
    from farebox.settings import Settings
    from farebox.supervisor import plan_children

    children = plan_children(Settings(), {}, scale={}, use_emulator=True)
    planned = {c.name: c.argv[c.argv.index("farebox") + 1 :] for c in children}
    assert set(farebox_services) == set(planned)
    for name, argv in planned.items():
        cmd = command_of(farebox_services[name])
        if name == "emulator":
            assert cmd[: len(argv)] == argv, "the emulator service adds flags, never changes them"
        else:
            assert cmd == argv, f"{name}: compose runs {cmd}, farebox up runs {argv}"


# --- compose: environment, dependencies, scaling -------------------------------------------------
def test_environment_names_are_real_settings(farebox_services: dict[str, dict[str, Any]]) -> None:
    from farebox.emulator.knobs import EmulatorKnobs
    from farebox.providers.registry import BUILTINS
    from farebox.settings import Settings

    fields = {f"FAREBOX_{name.upper()}" for name in Settings.model_fields}
    knobs = {f"FAREBOX_EMULATOR_{name.upper()}" for name in EmulatorKnobs.model_fields}
    provider_vars = {b.key_env for b in BUILTINS} | {b.url_env for b in BUILTINS}
    for name, s in farebox_services.items():
        for var in env_of(s):
            if var.startswith("FAREBOX_"):
                assert var in fields | knobs, f"{name}: {var} is read by nothing"
            else:
                assert var in provider_vars, f"{name}: {var} is read by nothing"


def test_worker_environment(workers: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch) -> None:
    from farebox.providers.registry import BUILTINS, emulator_url, provider_configs
    from farebox.settings import Settings

    assert set(workers) >= {"dedup", "route", "account"}
    for name, s in workers.items():
        env = env_of(s)
        assert env["FAREBOX_AMQP_URL"] == "amqp://guest:guest@rabbitmq:5672/", name
        assert env["FAREBOX_REDIS_URL"] == "redis://redis:6379/0", name
        assert env["FAREBOX_EMULATOR_URL"] == f"http://emulator:{EMULATOR_PORT}", name
        for b in BUILTINS:  # real keys reach the workers, unset ones stay empty
            assert b.key_env in env, f"{name}: {b.key_env} is not passed through"
            assert env_of(s, {b.key_env: "sk-test"})[b.key_env] == "sk-test"

        with pytest.MonkeyPatch.context() as mp:
            for var, value in env.items():
                mp.setenv(var, value)
            settings = Settings()  # every value validates
            assert settings.metrics_port == METRICS_PORT
            configs = provider_configs(env, emulator_url=emulator_url(settings))
        assert all(
            c.emulated and c.base_url.startswith(f"http://emulator:{EMULATOR_PORT}/") for c in configs.values()
        ), f"{name}: with no key, providers must use the emulator"


def test_emulator_knobs_validate(services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch) -> None:
    from farebox.emulator.knobs import EmulatorKnobs

    env = env_of(services["emulator"])
    assert "FAREBOX_EMULATOR_FAIL_RATE" in env
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env.items():
            mp.setenv(var, value)
        knobs = EmulatorKnobs()
    assert knobs.fault_total == 0.0, "faults are opt-in"
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env_of(services["emulator"], {"FAREBOX_EMULATOR_FAIL_RATE": "0.2"}).items():
            mp.setenv(var, value)
        assert EmulatorKnobs().fail_rate == pytest.approx(0.2)


def test_ports_match_defaults(services: dict[str, dict[str, Any]], clean_env: pytest.MonkeyPatch) -> None:
    from urllib.parse import urlparse

    from farebox.settings import Settings

    defaults = Settings()
    assert defaults.metrics_port == METRICS_PORT
    assert defaults.emulator_port == EMULATOR_PORT
    assert urlparse(defaults.amqp_url).port == 5672
    assert urlparse(defaults.redis_url).port == 6379
    assert container_ports(services["rabbitmq"]) == {5672, 15672}
    assert container_ports(services["redis"]) == {6379}
    assert container_ports(services["prometheus"]) == {9090}
    assert container_ports(services["grafana"]) == {3000}


def test_workers_depend_on_healthy_services(
    services: dict[str, dict[str, Any]], workers: dict[str, dict[str, Any]]
) -> None:
    for name, s in workers.items():
        deps = s.get("depends_on")
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for needed in ("rabbitmq", "redis"):
            assert deps.get(needed, {}).get("condition") == "service_healthy", f"{name} -> {needed}"
        if command_of(s)[1] == "execute":
            assert deps.get("emulator", {}).get("condition") == "service_healthy", name
        assert s.get("restart") == "unless-stopped", name
    for name, s in services.items():
        for dep, how in (s.get("depends_on") or {}).items() if isinstance(s.get("depends_on"), dict) else ():
            assert dep in services, f"{name} depends on missing {dep}"
            if how.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"


def test_worker_healthchecks_ask_the_readiness_probe(workers: dict[str, dict[str, Any]]) -> None:
    from farebox import health

    for name, s in workers.items():
        check = " ".join(s["healthcheck"]["test"])
        assert f"http://127.0.0.1:{METRICS_PORT}{health.READYZ}'" in check, f"{name}: {check}"


def test_workers_scale(workers: dict[str, dict[str, Any]]) -> None:
    for name, s in workers.items():
        assert "container_name" not in s, f"{name}: container_name blocks --scale"
        assert not s.get("ports"), f"{name}: a fixed host port blocks --scale"
        assert "hostname" not in s, name


# --- Prometheus ---------------------------------------------------------------------------------
def test_prometheus_config_mounted(services: dict[str, dict[str, Any]]) -> None:
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in services["prometheus"]["volumes"]}
    assert mounts.get("./deploy/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    assert PROMETHEUS.is_file()


def test_prometheus_scrapes_every_worker_replica(workers: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    scraped: dict[str, str] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type") == "A", "A records give one target per replica"
            assert sd["port"] == METRICS_PORT
            for dns_name in sd["names"]:
                assert dns_name not in scraped, f"{dns_name} scraped twice"
                scraped[dns_name] = job["job_name"]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                assert target.split(":")[0] not in workers, f"{target}: a static target misses replicas"
    assert set(workers) <= set(scraped), f"not scraped: {sorted(set(workers) - set(scraped))}"
    assert set(scraped) <= set(workers), f"scraping non-workers: {sorted(set(scraped) - set(workers))}"
    # One job per stage: the job is the stage name, whatever the provider.
    for name, job in scraped.items():
        assert job == command_of(workers[name])[1], f"{name} is in job {job}"


# --- Grafana ------------------------------------------------------------------------------------
def _grafana_mounts(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    out = {}
    for v in services["grafana"]["volumes"]:
        parts = str(v).split(":")
        if parts[0].startswith("./"):
            out[parts[1]] = parts[0]
    return out


def test_grafana_setup(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    env = env_of(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = _grafana_mounts(services)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (ROOT / provisioning / "datasources").is_dir()
    assert (ROOT / provisioning / "dashboards").is_dir()

    sources = [
        d
        for f in (ROOT / provisioning / "datasources").glob("*.y*ml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    prom = [d for d in sources if d["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0]["url"] == "http://prometheus:9090"

    providers = [
        p
        for f in (ROOT / provisioning / "dashboards").glob("*.y*ml")
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    for p in providers:  # the folder Grafana reads is mounted from a folder holding dashboards
        container_dir = p["options"]["path"]
        assert container_dir in mounts, f"{container_dir} is not mounted into grafana"
        assert list((ROOT / mounts[container_dir]).glob("*.json")), f"no dashboard in {mounts[container_dir]}"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        folder, _, file = home.rpartition("/")
        assert (ROOT / mounts[folder] / file).is_file(), home


def _dashboard() -> dict[str, Any]:
    files = list((GRAFANA / "dashboards").glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows


def _exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", s):
        if m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in m.group(1).split(",") if x.strip())
    for m in re.finditer(r"\{([^}]*)\}", expr):
        labels.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(1)))
    return labels


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, provider) (rate(a_bucket{x="b c"}[$__rate_interval]))) '
        "/ ignoring(z) b_total offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert grouping_labels(expr) == {"le", "provider", "x", "z"}


def test_dashboard_queries_use_registered_metrics(registered_metrics: tuple[set[str], dict[str, set[str]]]) -> None:
    names, labels = registered_metrics
    dash = _dashboard()
    used: set[str] = set()
    for expr in _exprs(dash):
        found = metric_names(expr)
        assert found, f"no metric in {expr!r}"
        unknown = found - names
        assert not unknown, f"{expr!r} uses metrics no process exports: {sorted(unknown)}"
        allowed = set().union(*(labels.get(n, set()) for n in found))
        extra = grouping_labels(expr) - allowed - {"job", "instance", "service"}
        assert not extra, f"{expr!r} uses labels its metrics do not have: {sorted(extra)}"
        used |= found
    for required in (
        "llm_proxy_cost_total",
        "llm_proxy_savings_total",
        "llm_proxy_request_total",
        "llm_proxy_latency_seconds_bucket",
        "llm_proxy_errors_total",
        "llm_proxy_retries_total",
        "llm_proxy_token_count_input_total",
        "llm_proxy_token_count_output_total",
        "llm_proxy_budget_used_ratio",
    ):
        assert required in used, f"the dashboard has no panel on {required}"
    exprs = " ".join(_exprs(dash))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    sources = [
        d
        for f in (GRAFANA / "provisioning" / "datasources").glob("*.y*ml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    uids = {d["uid"] for d in sources if "uid" in d}
    dash = _dashboard()
    assert dash.get("uid") and dash.get("title")
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dash):
        if p.get("type") == "row":
            continue
        for ds in [p.get("datasource"), *(t.get("datasource") for t in p.get("targets", []))]:
            if isinstance(ds, dict):
                assert ds.get("uid") in uids, f"panel {p['title']!r}: datasource {ds} is not provisioned"


# --- Dockerfile ---------------------------------------------------------------------------------
def test_dockerfile_installs_the_locked_tree_and_the_wheel() -> None:
    steps = dockerfile_instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"\bpip wheel\b.*\s\.(?:\s|$|&)", runs), "the image must build farebox's wheel from the context"
    assert "--require-hashes -r /tmp/requirements-runtime.lock" in runs, "the image must install the locked tree"
    assert re.search(r"pip install --no-deps /tmp/wheels/\*\.whl", runs)
    copied = [rest.split()[0] for word, rest in steps if word == "COPY" and not rest.startswith("--from")]
    assert "." in copied and "requirements-runtime.lock" in copied
    assert (ROOT / "requirements-runtime.lock").is_file()
    locked = re.search(r"^setuptools==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert locked and f'"setuptools=={locked.group(1)}"' in runs, "the wheel stage builds with the locked setuptools"
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "FAREBOX_METRICS_HOST=0.0.0.0" in env, "in the image the metrics must answer on every interface"
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["farebox"]
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert "farebox" in tomllib.load(f)["project"]["scripts"]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = {
        ln.strip().rstrip("/") for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    assert {".venv", ".git", "tests", "bench"} <= lines
    assert any("__pycache__" in ln for ln in lines)
    # What the wheel is built from: the package, the folders it links in, and the project files.
    needed = {"farebox", "schemas", "workers", "catalog", "pyproject.toml", "README.md", "requirements-runtime.lock"}
    assert not needed & lines, f"ignored but needed by the build: {sorted(needed & lines)}"
