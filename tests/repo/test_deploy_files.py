"""docker-compose files, Dockerfile and the documented production steps: parsed and checked against the code."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.core.config import Settings

REPO = Path(__file__).resolve().parents[2]
# The production steps (Compose, GPU workers, without Docker) live on this page of the docs site.
PRODUCTION_PAGE = "docs/operations/production.md"


def _compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / name).read_text())
    return data


def _parses(command: list[str]) -> Any:
    """The CLI's parse of a `maml-serve ...` command line (fails the test if it would not start)."""
    assert command[0] == "maml-serve", command
    try:
        return build_parser(core=False).parse_args(command[1:])
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"not a valid maml-serve command: {command} ({exc})")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    from importlib.resources import files

    import jsonschema

    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_compose(name))
    ]
    assert not errors, errors


def test_compose_services_run_real_commands_with_real_settings() -> None:
    services = _compose("docker-compose.yml")["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "trainer"} <= set(services)
    fields = set(Settings.model_fields)
    for name, service in services.items():
        command = service.get("command")
        if command and command[0] == "maml-serve":
            _parses(command)
        for key in _env(service):
            if key.startswith("MAML_SERVE_"):
                assert key.removeprefix("MAML_SERVE_").lower() in fields, (
                    f"{name}: {key} is no setting"
                )
    assert _parses(services["migrate"]["command"]).command == "migrate"
    assert _parses(services["api"]["command"]).command == "serve"
    worker = _parses(services["worker"]["command"])
    assert set(worker.queues.split(",")) == {"adapt"}
    trainer = _parses(services["trainer"]["command"])
    assert trainer.queues == "train" and trainer.pool == "solo"
    # The trainer's limit is the meta-training one; the adapt limit belongs to the adapt worker.
    assert "MAML_SERVE_TRAIN_TIME_LIMIT_SECONDS" in _env(services["trainer"])
    assert "MAML_SERVE_TASK_TIME_LIMIT_SECONDS" not in _env(services["trainer"])
    for name in ("api", "worker", "trainer", "migrate"):
        env = _env(services[name])
        assert env["MAML_SERVE_ENVIRONMENT"] == "production"
        assert "MAML_SERVE_API_KEY_PEPPER" in env and "MAML_SERVE_BROKER_URL" in env


def test_the_omniglot_zip_is_mounted_where_the_api_looks() -> None:
    api = _compose("docker-compose.yml")["services"]["api"]
    path = _env(api)["MAML_SERVE_OMNIGLOT_PATH"]
    targets = [str(v).rsplit(":", 2)[1] for v in api["volumes"] if str(v).count(":") >= 1]
    assert any(path.startswith(target.rstrip("/") + "/") for target in targets), (path, targets)


def test_required_variables_are_in_env_example_and_created_by_the_docs() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == {"POSTGRES_PASSWORD", "MAML_SERVE_API_KEY_PEPPER"}
    example = (REPO / ".env.example").read_text()
    production = _doc_section(PRODUCTION_PAGE, "## Production")
    for name in required:
        assert re.search(rf"^{name}=", example, re.M), f".env.example lacks {name}"
        assert f"{name}=" in production, f"the documented production steps do not set {name}"
    assert ".env" in (REPO / ".gitignore").read_text().split()
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def _default(value: str) -> str:
    """The default of a `${NAME:-default}` value (the value itself when it has none)."""
    found = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return found.group(1) if found else value


def test_artifacts_live_in_the_compose_s3_server_and_no_folder_is_shared() -> None:
    services = _compose("docker-compose.yml")["services"]
    seaweed = services["seaweedfs"]
    assert seaweed["image"].startswith("chrislusf/seaweedfs:")
    flags = dict(f.removeprefix("-").split("=", 1) for f in seaweed["command"][1:])
    assert seaweed["command"][0] == "mini" and flags["master.telemetry"] == "false"
    assert "ports" not in seaweed, "the S3 server is for the compose network only"
    apps = ("api", "worker", "trainer", "migrate")
    for name in apps:
        env = _env(services[name])
        assert env["MAML_SERVE_ARTIFACT_BACKEND"] == "s3", name
        assert _default(env["MAML_SERVE_S3_BUCKET"]) == _default(flags["bucket"])
        assert _default(env["MAML_SERVE_S3_ENDPOINT_URL"]) == f"http://seaweedfs:{flags['s3.port']}"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == _env(seaweed)[key], f"{name}: {key} differs from the server's"
        if name != "migrate":
            assert services[name]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    settings = Settings(
        artifact_backend="s3",
        s3_bucket=_default(flags["bucket"]),
        s3_endpoint_url=_default(_env(services["api"])["MAML_SERVE_S3_ENDPOINT_URL"]),
    )
    assert settings.artifact_backend == "s3"
    # Each named volume belongs to one service: the API and the workers meet only in PostgreSQL,
    # Redis and the bucket.
    owners: dict[str, list[str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/", "$")):
                owners.setdefault(source, []).append(name)
    assert {v: o for v, o in owners.items() if len(o) > 1} == {}
    assert "artifacts" not in _compose("docker-compose.yml")["volumes"]
    example = (REPO / ".env.example").read_text()
    text = (REPO / "docker-compose.yml").read_text()
    for variable in set(re.findall(r"\$\{(\w*S3\w*):-", text)):
        assert variable in example, f".env.example does not mention {variable}"


def test_gpu_override_gives_the_workers_a_cuda_build_and_the_gpus() -> None:
    base = _compose("docker-compose.yml")["services"]
    override = _compose("docker-compose.gpu.yml")["services"]
    assert set(override) == {"worker", "trainer"} and set(override) <= set(base)
    for service in override.values():
        assert service["build"]["args"]["TORCH_VARIANT"].startswith("${")
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "ARG TORCH_VARIANT=cpu" in (REPO / "Dockerfile").read_text()


def test_the_image_and_the_docs_give_the_processes_their_allocator() -> None:
    # jemalloc for `serve` and `worker` (app/core/allocator.py); two glibc arenas otherwise,
    # without which the API's RSS crept ~15 KB per task with its caches full (bench_many_tasks).
    from app.core.allocator import GLIBC_TUNING

    dockerfile = (REPO / "Dockerfile").read_text()
    assert "libjemalloc2" in dockerfile and "MALLOC_ARENA_MAX=2" in dockerfile
    assert "apt-get install libjemalloc2" in (REPO / PRODUCTION_PAGE).read_text()
    assert GLIBC_TUNING["MALLOC_ARENA_MAX"] == "2"


def test_dockerfile_copies_what_exists_and_starts_the_api() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    cmd = next(line for line in lines if line.startswith("CMD "))
    assert _parses(eval(cmd.removeprefix("CMD "))).command == "serve"


def _doc_section(page: str, title: str) -> str:
    """The section of a Markdown page under `title` (e.g. "## Production"), subsections included.

    It ends at the next heading of the same or a higher level; lines in fenced code blocks
    (shell comments) are never headings.
    """
    level = len(title) - len(title.lstrip("#"))
    lines = (REPO / page).read_text().splitlines()
    start = lines.index(title)
    fenced = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"(#+) ", line)
        if not fenced and heading and len(heading.group(1)) <= level:
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def _documents() -> list[Path]:
    """README.md and every page of the docs site."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_readme_commands_exist() -> None:
    subcommands = set(build_parser(core=False)._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    seen = 0
    for document in _documents():
        name = document.relative_to(REPO)
        blocks = re.findall(r"```bash\n(.*?)```", document.read_text(), re.S)
        for block in blocks:
            for line in block.splitlines():
                for match in re.finditer(r"maml-serve ([a-z][a-z-]*)", line):
                    assert match.group(1) in subcommands, (
                        f"{name} runs maml-serve {match.group(1)}: {line}"
                    )
                    seen += 1
                for compose_file in re.findall(r"-f (\S+\.ya?ml)", line):
                    assert (REPO / compose_file).is_file(), f"{name} names missing {compose_file}"
    assert seen > 5
    production = _doc_section(PRODUCTION_PAGE, "## Production")
    assert "--queues train" in production, "the no-Docker steps start a train worker"
    assert "docker-compose.gpu.yml" in production
    for line in production.splitlines():
        if line.startswith("maml-serve worker"):
            _parses(shlex.split(line.split("#")[0].strip().rstrip("&")))
