"""Real third-party projects for end-to-end tests: fetched from their registries with the ordinary
clients (pinned versions, a cache outside this repository), unpacked, made git repositories, and
given one planted bug in a second commit on ``main`` (the task's base)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The shared interpreter, not its virtualenv: a project's own venv is built from it inside the box.
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")
JUNIT = '--junitxml="$AGENTRUNNER_JUNIT_XML"'


@dataclass(frozen=True)
class Project:
    name: str  # also the repository's name
    registry: str  # "pypi" | "npm"
    package: str
    version: str
    path: str  # the file holding the planted bug
    good: str  # the line as released (exactly one occurrence in `path`)
    bad: str  # the line with the bug
    test_command: str
    setup_command: str = ""
    keep_paths: list[str] = field(default_factory=list)
    setup_watch_files: list[str] = field(default_factory=list)
    min_passed: int = 100  # the project's own suite: at least this many tests pass
    setup_marker: str = ""  # a file in a kept folder that the setup command appends a line to


# A pure-Python library, no setup: its suite runs on the runner's interpreter (pytest only).
TOOLZ = Project(
    name="toolz",
    registry="pypi",
    package="toolz",
    version="1.0.0",
    path="toolz/itertoolz.py",
    good="    return itertools.islice(seq, 0, None, n)\n",
    bad="    return itertools.islice(seq, 1, None, n)\n",
    test_command=f"{sys.executable} -m pytest -q -p no:cacheprovider {JUNIT} toolz",
    min_passed=170,
)

# A setup that installs into a kept virtualenv, which the project's own .gitignore ignores.
MORE_ITERTOOLS = Project(
    name="more-itertools",
    registry="pypi",
    package="more-itertools",
    version="10.5.0",
    path="more_itertools/recipes.py",
    good="    return list(islice(iterable, n))\n",
    bad="    return list(islice(iterable, n - 1))\n",
    setup_command=(
        f"{BASE_PYTHON} -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check pytest==8.3.3"
        " && echo ran >> .venv/agentrunner-setup-runs"
    ),
    keep_paths=[".venv"],
    setup_watch_files=["pyproject.toml"],
    test_command=f".venv/bin/python -m pytest -q -p no:cacheprovider {JUNIT} tests",
    min_passed=600,
    setup_marker=".venv/agentrunner-setup-runs",
)

# Not Python: an npm package that ships its tests (tape files). Setup installs the runner it declares
# into a kept folder (no .gitignore here: kept paths alone keep it out of commits); node's own test
# runner runs each file and writes JUnit XML, one test case per file.
MINIMIST = Project(
    name="minimist",
    registry="npm",
    package="minimist",
    version="1.2.8",
    path="index.js",
    good="\treturn (/^[-+]?(?:\\d+(?:\\.\\d*)?|\\.\\d+)(e[-+]?\\d+)?$/).test(x);\n",
    bad="\treturn (/^[-+]?\\d+(e[-+]?\\d+)?$/).test(x);\n",
    setup_command=(
        # A folder of its own (not --prefix, which would also move npm's global config away):
        # only the runner, not the project's whole list of development tools.
        "mkdir -p .deps && cd .deps && echo '{}' > package.json && npm install --no-save --no-package-lock"
        " --ignore-scripts --no-audit --no-fund --cache .npm-cache --loglevel=error tape@5.6.3"
        " && echo ran >> agentrunner-setup-runs"
    ),
    keep_paths=[".deps"],
    setup_watch_files=["package.json"],
    test_command=(
        "NODE_PATH=.deps/node_modules node --test --test-reporter=spec"
        ' --test-reporter=junit --test-reporter-destination=stdout --test-reporter-destination="$AGENTRUNNER_JUNIT_XML" test/'
    ),
    min_passed=15,
    setup_marker=".deps/agentrunner-setup-runs",
)


def run_git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ, "GIT_AUTHOR_NAME": "Test Author", "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Author", "GIT_COMMITTER_EMAIL": "author@example.com", "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": "/tmp",
    }  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "agentrunner-test-projects"


class FetchError(Exception):
    pass


def _archive_name(project: Project) -> str:
    if project.registry == "npm":
        return f"{project.package.lstrip('@').replace('/', '-')}-{project.version}.tgz"
    return f"{project.package.replace('-', '_')}-{project.version}.tar.gz"


def fetch(project: Project) -> Path:
    """The project's source archive from the cache, downloaded first when missing."""
    cache = cache_dir() / project.registry
    cache.mkdir(parents=True, exist_ok=True)
    for candidate in cache.glob(f"*{project.version}.t*gz"):
        stem = candidate.name.lower().replace("_", "-")
        if stem.startswith(project.package.lower().replace("_", "-").lstrip("@").replace("/", "-") + "-"):
            return candidate
    # Download into a scratch folder of the cache, then move: a half-written file is never found.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        if project.registry == "pypi":
            command = [
                sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--no-binary", ":all:", f"{project.package}=={project.version}", "-d", scratch,
            ]  # fmt: skip
        else:
            command = ["npm", "pack", "--silent", f"{project.package}@{project.version}"]
        try:
            result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"{' '.join(command[:4])}: {exc}") from exc
        archives = [p for p in Path(scratch).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if result.returncode != 0 or len(archives) != 1:
            raise FetchError(f"{' '.join(command)} exited with {result.returncode}: {result.stderr[-1500:]}")
        target = cache / archives[0].name
        os.replace(archives[0], target)
        return target


def make_repository(project: Project, archive: Path, root: Path) -> tuple[Path, str]:
    """Unpack into ``root/<name>``, commit the release on ``main``, then commit the planted bug.
    Returns the path and the commit of the release."""
    unpack = root / f"{project.name}-unpack"
    with tarfile.open(archive) as tar:
        tar.extractall(unpack, filter="data")
    (top,) = list(unpack.iterdir())  # sdists and npm packs hold one top folder
    path = root / project.name
    shutil.move(str(top), path)
    unpack.rmdir()
    run_git(path, "init", "-q", "-b", "main")
    run_git(path, "add", "-A", "-f")  # sdists ship generated files (egg-info) that .gitignore lists
    run_git(path, "commit", "-q", "-m", f"{project.package} {project.version} as released")
    release = run_git(path, "rev-parse", "HEAD")
    source = path / project.path
    text = source.read_text()
    assert text.count(project.good) == 1, f"{project.path}: the line to break is not unique"
    source.write_text(text.replace(project.good, project.bad))
    run_git(path, "commit", "-q", "-am", "A regression")
    return path, release
