"""deploy/: the compose file, the Kubernetes manifests and the Dockerfiles agree with the
code. No Docker engine and no cluster: every check reads the files and compares them with
the real click CLI, the settings classes and the tree on disk."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from streamrec.cli import cli
from streamrec.settings import EXTRA_ENV, SECTIONS, check_environment, env_name, load

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")

# The Prometheus job of each streamrec role, the CLI command that runs it, and the
# setting that gives the port its metrics are served on.
ROLES = {
    "streamrec-sessions": (("ingest", "sessions"), "ingest", "sessions_metrics_port"),
    "streamrec-archive": (("ingest", "archive"), "ingest", "archive_metrics_port"),
    "streamrec-serving": (("serve",), "serving", "port"),
    "streamrec-monitor": (("monitor",), "monitor", "metrics_port"),
    "streamrec-retrain": (("retrain",), "retrain", "metrics_port"),
}
# A command-line option that overrides the port setting (streamrec serve --port ...).
PORT_OPTIONS = {"port", "metrics_port"}
GRAFANA_MOUNTS = ("./grafana/provisioning:/etc/grafana/provisioning:ro",
                  "./grafana/dashboards:/var/lib/grafana/dashboards:ro")


# -- helpers ------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in _yaml_docs(p)]


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in _k8s_objects() if o["kind"] == kind}


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _streamrec_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("Deployment", "CronJob"):
        for name, obj in _of_kind(kind).items():
            for c in _pod_spec(obj)["containers"]:
                yield f"{kind}/{name}/{c['name']}", c


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _entrypoint(path: Path) -> list[str]:
    [value] = [rest for word, rest in _dockerfile_instructions(path) if word == "ENTRYPOINT"]
    return json.loads(value)


def _cli_argv(argv: list[str], entrypoint: list[str]) -> list[str]:
    """The streamrec arguments of a container: after `streamrec` in entrypoint + command."""
    full = [*entrypoint, *argv]
    assert "streamrec" in full, f"{full} does not run the streamrec CLI"
    return full[full.index("streamrec") + 1:]


def _parse_cli(argv: list[str]) -> tuple[tuple[str, ...], click.Context]:
    """Resolve argv against the real CLI and parse (and type-check) its options.

    Nothing is run: the subcommand path is walked through the groups, then the leaf
    command's parser converts every option the way `streamrec` would.
    """
    cmd: click.Command = cli
    path: list[str] = []
    rest = list(argv)
    while isinstance(cmd, click.Group):
        assert rest and rest[0] in cmd.commands, (
            f"`streamrec {' '.join(argv)}`: no command {rest[:1]} under "
            f"`streamrec {' '.join(path)}` (has {sorted(cmd.commands)})")
        cmd = cmd.commands[rest[0]]
        path.append(rest.pop(0))
    ctx = cmd.make_context(" ".join(["streamrec", *path]), rest)
    # The CLI itself agrees that the command exists and has --help.
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="streamrec")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: streamrec {' '.join(path)}"), result.output
    return tuple(path), ctx


def _settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every settings section built from exactly ``env`` (the way a container starts)."""
    for key in list(os.environ):
        if key.startswith("STREAMREC_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    check_environment()  # a misspelt STREAMREC_* variable stops every command
    return {section: load(cls) for section, cls in SECTIONS.items()}


def _known_env() -> set[str]:
    return set(EXTRA_ENV) | {env_name(s, f) for s, cls in SECTIONS.items()
                             for f in cls.model_fields}


def _documented_env() -> set[str]:
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    return set(re.findall(r"`(STREAMREC_[A-Z0-9_]+)`", text))


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _compose_streamrec_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _compose()["services"].items()
            if str(svc.get("image", "")).startswith("streamrec:")}


def _container_env(c: dict[str, Any]) -> dict[str, str]:
    """A container's environment: its envFrom ConfigMaps / Secrets (in this repo), then env."""
    maps, secrets = _of_kind("ConfigMap"), _of_kind("Secret")
    env: dict[str, str] = {}
    for ref in c.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(maps[ref["configMapRef"]["name"]]["data"])
        else:
            name = ref["secretRef"]["name"]
            if name not in secrets:
                assert ref["secretRef"].get("optional"), f"Secret {name} is not in deploy/k8s"
                continue
            env.update(secrets[name].get("stringData", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def _prometheus_jobs() -> dict[str, list[str]]:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}


# -- every file parses ---------------------------------------------------------------------


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")})
    assert COMPOSE in files and len(files) >= 10
    for path in files:
        assert _yaml_docs(path), f"{path} is empty"


def test_every_k8s_object_is_named_and_labelled() -> None:
    objects = _k8s_objects()
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "CronJob", "HorizontalPodAutoscaler", "ConfigMap",
            "Secret"} <= kinds
    for o in objects:
        assert o.get("apiVersion") and o["metadata"].get("name"), o
        assert o["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "streamrec", o


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


# -- Kubernetes -----------------------------------------------------------------------------


def test_every_deployment_has_probes_resources_and_a_hardened_container() -> None:
    deployments = _of_kind("Deployment")
    assert set(deployments) == {j for j in ROLES if j != "streamrec-retrain"}
    for name, dep in deployments.items():
        spec = _pod_spec(dep)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in c, f"{where}: no {probe}"
                action = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                assert action, f"{where}: {probe} has no httpGet / tcpSocket"
                ports = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
                assert action["port"] in ports, f"{where}: {probe} probes an undeclared port"
            res = c["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: {part}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_retrain_cronjob_runs_once_without_overlap_and_has_resources() -> None:
    [job] = _of_kind("CronJob").values()
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    [c] = _pod_spec(job)["containers"]
    path, ctx = _parse_cli(_cli_argv(c.get("command", []) + c.get("args", []),
                                     [] if c.get("command") else _entrypoint(DOCKERFILES[0])))
    assert path == ("retrain",) and ctx.params["once"] is True
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert _container_env(c)["STREAMREC_RETRAIN_LOCK"] == "redis"


def test_every_container_runs_an_existing_cli_command_of_its_role() -> None:
    entrypoint = _entrypoint(DOCKERFILES[0])
    seen = set()
    for where, c in _streamrec_containers():
        argv = c.get("command", []) + c.get("args", [])
        path, _ = _parse_cli(_cli_argv(argv, [] if c.get("command") else entrypoint))
        job = where.split("/")[1]
        assert path == ROLES[job][0], f"{where} runs `streamrec {' '.join(path)}`"
        seen.add(job)
    assert seen == set(ROLES)


def test_every_streamrec_variable_in_k8s_is_a_real_valid_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    known, documented = _known_env(), _documented_env()
    names = set()
    for obj in _k8s_objects():
        if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"] != "streamrec-prometheus":
            names |= set(obj.get("data", {})) | set(obj.get("stringData", {}))
    for _, c in _streamrec_containers():
        names |= {e["name"] for e in c.get("env", [])}
    names = {n for n in names if n.startswith("STREAMREC_")}
    assert names and names <= known, f"not settings: {sorted(names - known)}"
    assert names <= documented | set(EXTRA_ENV), sorted(names - documented)
    for where, c in _streamrec_containers():  # and each container's values validate
        try:
            _settings_from_env(_container_env(c), monkeypatch)
        except ValueError as e:
            pytest.fail(f"{where}: {e}")


def test_services_select_deployments_and_target_declared_ports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    deployments = _of_kind("Deployment")
    services = _of_kind("Service")
    assert set(services) == set(deployments)
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        matched = [d for d in deployments.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert [d["metadata"]["name"] for d in matched] == [name], f"Service {name} selects {matched}"
        dep = matched[0]
        assert dep["spec"]["selector"]["matchLabels"].items() <= \
            dep["spec"]["template"]["metadata"]["labels"].items()
        [c] = _pod_spec(dep)["containers"]
        declared = {p["name"]: p["containerPort"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = declared.get(target, target)
            assert number in declared.values(), f"Service {name} targets undeclared port {target}"
        # The process listens where the Service points: the role's port setting.
        _, section, field = ROLES[name]
        settings = _settings_from_env(_container_env(c), monkeypatch)
        assert getattr(settings[section], field) in declared.values(), name


def test_pdb_and_hpa_target_the_serving_deployment() -> None:
    deployments = _of_kind("Deployment")
    [hpa] = _of_kind("HorizontalPodAutoscaler").values()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "streamrec-serving")
    assert ref["apiVersion"] == deployments["streamrec-serving"]["apiVersion"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # CPU utilisation is relative to the request, so the serving container must have one.
    assert all("cpu" in c["resources"]["requests"]
               for c in _pod_spec(deployments["streamrec-serving"])["containers"])
    for pdb in _of_kind("PodDisruptionBudget").values():
        labels = deployments["streamrec-serving"]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_serving_probes_use_the_health_endpoints() -> None:
    [c] = _pod_spec(_of_kind("Deployment")["streamrec-serving"])["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    from serving.app import create_app  # the paths exist in the app (checked by name)

    source = Path(create_app.__code__.co_filename).read_text(encoding="utf-8")
    assert '"/healthz"' in source and '"/readyz"' in source


# -- compose --------------------------------------------------------------------------------


def test_compose_services_run_existing_cli_commands_of_their_role() -> None:
    services = _compose_streamrec_services()
    entrypoint = _entrypoint(DOCKERFILES[0])
    for name, svc in services.items():
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == \
            DOCKERFILES[0]
        path, _ = _parse_cli(_cli_argv(svc["command"], entrypoint))
        if name in ROLES:
            assert path == ROLES[name][0], f"compose service {name} runs {path}"
    assert set(ROLES) <= set(services)


def test_every_streamrec_variable_in_compose_is_a_real_valid_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    known, documented = _known_env(), _documented_env()
    for name, svc in _compose_streamrec_services().items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        names = {k for k in env if k.startswith("STREAMREC_")}
        assert names <= known, f"{name}: not settings: {sorted(names - known)}"
        assert names <= documented | set(EXTRA_ENV), f"{name}: {sorted(names - documented)}"
        try:
            _settings_from_env(env, monkeypatch)
        except ValueError as e:
            pytest.fail(f"compose service {name}: {e}")


def test_compose_points_streamrec_at_its_kafka_and_redis() -> None:
    compose = _compose()
    for name, svc in _compose_streamrec_services().items():
        env = svc["environment"]
        for hostport in env["STREAMREC_KAFKA_BOOTSTRAP"].split(","):
            host, port = hostport.rsplit(":", 1)
            assert host in compose["services"], f"{name}: no compose service {host}"
            listeners = compose["services"][host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
            assert f"//{host}:{port}" in listeners, f"{name}: {hostport} is not advertised"
        redis_host = re.match(r"rediss?://([^:/]+)", env["STREAMREC_REDIS_URL"]).group(1)
        assert redis_host in compose["services"], name
        assert {"kafka", "redis"} <= set(svc["depends_on"]), name


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in compose["services"][dep], f"{dep} has no healthcheck"
    grafana = compose["services"]["grafana"]["volumes"]
    for mount in GRAFANA_MOUNTS:
        assert mount in grafana, f"grafana must mount {mount}"
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_compose_kafka_runs_in_kraft_mode() -> None:
    kafka = _compose()["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert not any("ZOOKEEPER" in k for k in env)


# -- Prometheus jobs <-> compose / k8s ------------------------------------------------------


def test_prometheus_jobs_scrape_the_compose_service_of_the_same_name_on_its_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = _prometheus_jobs()
    services = _compose_streamrec_services()
    entrypoint = _entrypoint(DOCKERFILES[0])
    assert set(ROLES) <= set(jobs)
    for job, (_, section, field) in ROLES.items():
        [target] = jobs[job]
        host, port = target.rsplit(":", 1)
        assert host == job and job in services, f"job {job} scrapes {target}"
        svc = services[job]
        settings = _settings_from_env({k: str(v) for k, v in svc["environment"].items()},
                                      monkeypatch)
        _, ctx = _parse_cli(_cli_argv(svc["command"], entrypoint))
        override = [v for k, v in ctx.params.items() if k in PORT_OPTIONS and v is not None]
        listens = override[0] if override else getattr(settings[section], field)
        assert int(port) == listens, f"job {job} scrapes port {port}; {job} listens on {listens}"


def test_prometheus_jobs_match_the_k8s_services_and_scrape_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = _prometheus_jobs()
    services = _of_kind("Service")
    deployments = _of_kind("Deployment")
    for job in ROLES:
        if job == "streamrec-retrain":
            continue  # a CronJob: pushed to a Pushgateway, see prometheus-config.yaml
        port = int(jobs[job][0].rsplit(":", 1)[1])
        assert port in [p["port"] for p in services[job]["spec"]["ports"]], job
        [c] = _pod_spec(deployments[job])["containers"]
        annotations = deployments[job]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port), job
        assert port in [p["containerPort"] for p in c["ports"]], job
    config = yaml.safe_load(_of_kind("ConfigMap")["streamrec-prometheus"]["data"]["prometheus.yml"])
    k8s_jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert "streamrec-retrain" in k8s_jobs
    relabel = k8s_jobs["streamrec"]["relabel_configs"]
    # The job label of the discovered targets is the Service name (= the compose job names).
    assert {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"} in relabel
    port_names = next(r["regex"] for r in relabel
                      if r.get("source_labels") == ["__meta_kubernetes_endpoint_port_name"])
    for svc in services.values():
        assert all(re.fullmatch(port_names, p["name"]) for p in svc["spec"]["ports"]), svc


# -- Dockerfiles ----------------------------------------------------------------------------


def _dockerignored(rel: str) -> bool:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(rel).parts
    return any(Path(*parts[:i]).match(p.lstrip("/")) for p in patterns for i in range(1, len(parts) + 1))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_sources_and_every_package(dockerfile: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = set()
    for word, rest in _dockerfile_instructions(dockerfile):
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = [a for a in shlex.split(rest) if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: not in the repository"
            assert not _dockerignored(src), f"{dockerfile.name}: COPY {src} is in .dockerignore"
            copied.add(src.rstrip("/"))
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    assert packages <= copied, f"{dockerfile.name} does not copy {sorted(packages - copied)}"
    readme = pyproject["project"]["readme"]
    assert {"pyproject.toml", "constraints.txt", readme} <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_is_the_streamrec_cli(dockerfile: Path) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = _entrypoint(dockerfile)
    assert entrypoint[-1] == "streamrec" and "streamrec" in scripts
    assert entrypoint[:-1] in ([], ["tini", "--"])
    text = dockerfile.read_text()
    if entrypoint[0] == "tini":
        assert re.search(r"apt-get install[^\n]*\btini\b", text)
    # torch at the pinned version, from a wheel index of the right kind.
    [torch] = [rest for word, rest in _dockerfile_instructions(dockerfile)
               if word == "RUN" and re.search(r"-c constraints.txt torch\b", rest)]
    assert "download.pytorch.org/whl/" in text
    if dockerfile.name.endswith(".cuda"):
        assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:", text) and "${TORCH_CUDA}" in torch
    else:
        assert "whl/cpu" in text and "${TORCH_INDEX_URL}" in torch
    [user] = [rest for word, rest in _dockerfile_instructions(dockerfile) if word == "USER"]
    assert user not in ("root", "0")


def test_the_image_gets_the_non_python_files_of_the_packages() -> None:
    """The image installs streamrec as a wheel, not editable: files other than .py
    (the demo page's static assets) must be declared package data, or they are left out."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    package_data = setuptools.get("package-data", {})
    missing = []
    for package in setuptools["packages"]:
        for path in (ROOT / package).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / package).as_posix()
            patterns = [*package_data.get(package, []), *package_data.get("*", [])]
            if not any(Path(rel).match(p) for p in patterns):
                missing.append(f"{package}/{rel}")
    assert not missing, (f"not package data (add them to [tool.setuptools.package-data] in "
                         f"pyproject.toml): {missing}")
