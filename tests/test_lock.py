"""requirements/lock.txt, the versions scripts/setup.sh installs, agrees with pyproject.toml and with this venv."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REFRESH = "bash scripts/lock.sh"
# The lock is resolved for Python 3.11 on x86_64 Linux (scripts/lock.sh); markers are read for that platform.
LOCK_ENVIRONMENT = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
                    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                    "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def read_lock(text: str) -> dict[str, Version]:
    """`name==version` lines of a uv / pip-compile lock (comments and `# via` lines skipped)."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def lock_problems(requirements: list[str], pins: dict[str, Version]) -> list[str]:
    """Requirements the lock leaves out or pins outside their range."""
    problems = []
    for line in dict.fromkeys(requirements):  # an extra may repeat another's requirement
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({**LOCK_ENVIRONMENT, "extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement} does not allow the locked {name}=={pins[name]}")
    return problems


def project_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    pins_in = [line.split("#")[0].strip() for line in (ROOT / "requirements/pins.in").read_text().splitlines()]
    return project["dependencies"] + [r for group in extras.values() for r in group] + [p for p in pins_in if p]


def test_lock_matches_pyproject():
    pins = read_lock((ROOT / "requirements/lock.txt").read_text())
    problems = lock_problems(project_requirements(), pins)
    assert not problems, (
        "requirements/lock.txt does not match pyproject.toml / requirements/pins.in:\n  " + "\n  ".join(problems)
        + f"\nRefresh it with `{REFRESH}` (it re-locks, sets up and runs the tests) and commit the new lock."
    )


def test_lock_check_finds_a_stale_lock():
    pins = read_lock("foo==1.0\n    # via bar\nBaz_Qux==2.0.1\n")
    assert pins == {"foo": Version("1.0"), "baz-qux": Version("2.0.1")}
    assert lock_problems(["foo>=1", "baz.qux<3", "win-only; sys_platform == 'win32'"], pins) == []
    assert lock_problems(["foo>=1.1", "missing>=0"], pins) == [
        "foo>=1.1 does not allow the locked foo==1.0", "missing>=0 is not in the lock"]


def test_installed_versions_are_the_locked_ones():
    """scripts/setup.sh installed what the lock says (a venv made otherwise may differ: this test then says so)."""
    pins = read_lock((ROOT / "requirements/lock.txt").read_text())
    pins |= read_lock((ROOT / "requirements/no-deps.txt").read_text())
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    if "omniola" not in installed:
        pytest.skip("omniola is not installed in this environment")
    differ = [f"{name}: locked {pins[name]}, installed {version}" for name, version in sorted(installed.items())
              if name in pins and Version(version.public) != pins[name]]  # torch's +cpu is a local label
    assert not differ, ("this environment is not the locked one; run `bash scripts/setup.sh`:\n  "
                        + "\n  ".join(differ))
