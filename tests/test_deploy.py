"""deploy/: the image recipe, the 3-node compose file and docs/DEPLOY.md agree with the CLI.

Without a container engine, what can be checked is checked: the compose
file's shape, every option and variable the files use against ``serve``'s
own, and the files the Containerfile copies. With podman (and a base image:
``make container-engine``) the image is built and started too, on the host's
network with the server bound to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from messagevault.cli import main
from tests.azurite import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
GUIDE = ROOT / "docs" / "DEPLOY.md"
NODES = ("node1", "node2", "node3")
BASE_IMAGES = ("localhost/messagevault-base:bookworm", "docker.io/library/python:3.11-slim")


def _serve() -> click.Command:
    assert isinstance(main, click.Group)
    return main.commands["serve"]


def _serve_variables() -> set[str]:
    variables: set[str] = set()
    for param in _serve().params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            variables.add(envvar)
        elif envvar:
            variables.update(envvar)
    return variables


def _compose() -> dict[str, Any]:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:  # PyYAML is no dependency: a rougher reading of the same facts
        return _compose_without_yaml(COMPOSE.read_text())
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _compose_without_yaml(text: str) -> dict[str, Any]:
    """Enough of compose.yaml for these tests: top-level sections, services' commands."""
    sections = re.findall(r"^([a-z][\w-]*):", text, re.MULTILINE)
    section = re.search(r"^services:\n((?:  .*\n|\n)+)", text, re.MULTILINE)
    assert section is not None, "compose.yaml has no services"
    services: dict[str, Any] = {}
    for name, body in re.findall(r"^  ([\w-]+):\n((?:    .*\n|\n)+)", section.group(1), re.M):
        command = re.search(r"command: (\[.*\])", body)
        services[name] = {"command": json.loads(command.group(1)) if command else []}
    return {section: {} for section in sections} | {"services": services}


# -- the compose file ------------------------------------------------------------------


def test_compose_runs_three_nodes_on_azurite_with_storage_from_a_secret_file() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"azurite", *NODES}
    for node in NODES:
        command = services[node]["command"]
        assert command == [
            "--node-id",
            node,
            "--advertise",
            f"http://{node}:8080",
            "--allow-plain-http",
        ]
    if "environment" not in services["node1"]:
        return  # read without PyYAML: the anchors and merges are beyond a rough reading
    secrets = compose["secrets"]
    for node in NODES:
        service = services[node]
        environment = service["environment"]
        assert "MESSAGEVAULT_STORAGE" not in environment  # never the string itself
        (secret,) = service["secrets"]
        assert environment["MESSAGEVAULT_STORAGE_FILE"] == f"/run/secrets/{secret}"
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Containerfile"}
        assert "azurite" in service["depends_on"]
    stored = (DEPLOY / secrets[secret]["file"]).read_text()
    assert stored.startswith("azure:DefaultEndpointsProtocol=http;")
    assert "BlobEndpoint=http://azurite:10000/" in stored


def test_no_account_key_is_on_any_command_line() -> None:
    for path in (COMPOSE, CONTAINERFILE):
        assert "AccountKey" not in path.read_text(), path


# -- options and variables against `serve` --------------------------------------------


def _options_used() -> dict[str, set[str]]:
    """The ``--options`` each file passes to ``messagevault serve``."""
    used: dict[str, set[str]] = {}
    compose = _compose()
    used["compose.yaml"] = {
        argument
        for service in compose["services"].values()
        for argument in service.get("command", [])
        if argument.startswith("--") and service is not compose["services"]["azurite"]
    }
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])", CONTAINERFILE.read_text(), re.MULTILINE)
    assert entrypoint is not None
    used["Containerfile"] = {a for a in json.loads(entrypoint.group(1)) if a.startswith("--")}
    guide = GUIDE.read_text()
    # Options in the guide's tables and text: `--option` in backquotes, or in a command.
    used["DEPLOY.md"] = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", guide)) - {
        "--url",  # publish's, in an example
        "--build-arg",  # podman's and az's own
        "--secret-volume-mount",
        "--secrets",
        "--build",
        "--rm",
    }
    return used


def test_every_serve_option_the_files_use_exists() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "serve", "--help"],
        capture_output=True,
        timeout=60,
        check=True,
        text=True,
    )
    offered = set(re.findall(r"(--[a-z][a-z-]+)", done.stdout))
    for where, options in _options_used().items():
        assert options, where
        assert options <= offered, f"{where} uses {sorted(options - offered)}"


def test_every_variable_the_files_set_is_one_serve_reads() -> None:
    known = _serve_variables()
    for path in (COMPOSE, CONTAINERFILE, GUIDE):
        used = set(re.findall(r"\b(MESSAGEVAULT_[A-Z_]+)\b", path.read_text()))
        assert used, path
        # The client's own variables may appear in the guide's examples.
        unknown = used - known - {"MESSAGEVAULT_USER", "MESSAGEVAULT_PASSWORD"}
        assert not unknown, f"{path.name} uses {sorted(unknown)}"


# -- the Containerfile -----------------------------------------------------------------


def test_the_containerfile_copies_files_that_exist_and_runs_serve_unprivileged() -> None:
    text = CONTAINERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    copies = re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE)
    assert copies
    sources = [source for line in copies for source in line.split()]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    ignored = (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
    for source in sources:  # the ignore file lets through what is copied
        assert f"!{source}" in ignored or f"!{source}/" in ignored, source
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert entrypoint is not None
    assert json.loads(entrypoint.group(1)) == ["messagevault", "serve", "--host", "0.0.0.0"]


# -- with a container engine: build the image and start it -------------------------------


def _podman(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _base_image() -> str | None:
    for image in (os.environ.get("MESSAGEVAULT_TEST_BASE_IMAGE"), *BASE_IMAGES):
        if image and _podman("image", "exists", image).returncode == 0:
            return image
    return None


def _runtime_options() -> list[str]:
    """What this kind of sandbox needs: runc (crun refuses hybrid cgroups) and low rlimits.

    Raising or even restating the host's rlimits is refused inside the
    container's setup here; limits below them are not.
    """
    options = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
    runc = shutil.which("runc")
    return ["--runtime", runc, *options] if runc else options


def _build_options() -> list[str]:
    """A TLS-inspecting proxy's CA bundle (this machine's pip uses one), lent to the build."""
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if not bundle or not Path(bundle).is_file():
        return []
    inside = "/etc/ssl/certs/build-ca.crt"
    return ["--volume", f"{bundle}:{inside}:ro", "--build-arg", f"PIP_CERT={inside}"]


@pytest.fixture
def image() -> Iterator[str]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (make container-engine installs it)")
    base = _base_image()
    if base is None:
        pytest.skip(
            f"no base image ({', '.join(BASE_IMAGES)}): Docker Hub cannot be reached from "
            "here; make container-engine builds the first from Debian's packages"
        )
    tag = f"localhost/messagevault-test:{os.getpid()}"
    built = _podman(
        "build",
        "--layers=false",  # no intermediate images left behind,
        "--force-rm",  # nor containers, even when a step fails
        "--network",
        "host",
        *_runtime_options(),
        *_build_options(),
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-f",
        str(CONTAINERFILE),
        "-t",
        tag,
        str(ROOT),
        timeout=600,
    )
    try:
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        yield tag
    finally:
        _podman("rmi", "--force", tag)


@contextlib.contextmanager
def _container(image: str, *arguments: str, env: dict[str, str]) -> Iterator[str]:
    name = f"messagevault-test-{os.getpid()}-{free_port()}"
    variables = [option for key, value in env.items() for option in ("-e", f"{key}={value}")]
    started = _podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        *_runtime_options(),
        *variables,
        image,
        *arguments,
    )
    try:
        assert started.returncode == 0, started.stderr
        yield name
    finally:
        _podman("rm", "--force", "--time", "10", name)


def _wait_for_health(port: int, name: str) -> None:
    deadline = time.monotonic() + 60
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            running = _podman("inspect", "--format", "{{.State.Running}}", name)
            if running.stdout.strip() != "true" or time.monotonic() > deadline:
                logs = _podman("logs", name)
                raise AssertionError(f"the container did not serve: {logs.stderr}") from None
            time.sleep(0.1)


def test_the_image_builds_refuses_plain_http_and_serves_as_told(image: str) -> None:
    # As built: 0.0.0.0 over plain HTTP, not told how passwords are protected.
    refused = _podman("run", "--rm", "--network", "none", *_runtime_options(), image)
    assert refused.returncode == 2
    assert "--allow-plain-http" in refused.stderr
    # Bound to 127.0.0.1 (the host's network: nothing goes beyond this machine).
    port = free_port()
    password_file = "/var/lib/messagevault/admin-password"
    with _container(
        image,
        "--host",
        "127.0.0.1",
        env={"MESSAGEVAULT_PORT": str(port), "MESSAGEVAULT_ADMIN_PASSWORD_FILE": password_file},
    ) as name:
        _wait_for_health(port, name)
        user = _podman("exec", name, "id", "-u").stdout.strip()
        assert user == "10001"
        password = _podman("exec", name, "cat", password_file).stdout
        assert len(password) >= 20
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/streams/orders",
            data=json.dumps({"messages": [{"value": "from the image"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        manager.add_password(None, f"http://127.0.0.1:{port}", "admin", password)
        opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(manager))
        with opener.open(request, timeout=30) as answer:
            assert json.loads(answer.read())["stream"] == "orders"
        logs = _podman("logs", name)
        assert password not in logs.stdout + logs.stderr
        assert f"its password is in {password_file}" in logs.stderr


def test_the_rough_reading_without_pyyaml_agrees_with_pyyaml() -> None:
    yaml = pytest.importorskip("yaml")
    full = yaml.safe_load(COMPOSE.read_text())
    rough = _compose_without_yaml(COMPOSE.read_text())
    assert set(rough) == set(full)
    assert {name: service["command"] for name, service in rough["services"].items()} == {
        name: service.get("command", []) for name, service in full["services"].items()
    }
