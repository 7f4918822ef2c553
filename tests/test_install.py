"""The install as the README gives it: the server's lock agrees with the project's own ranges."""
import re

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, locked_versions

LOCK = ROOT / "constraints" / "serve.txt"


def server_requirements() -> list:
    """The project's requirements that the server's install takes: the base ones, [serve] and [openvino]."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"] + extras["serve"] + extras["openvino"]]
    return [r for r in wanted if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_the_server_lock_pins_every_requirement_within_the_projects_range():
    pins = locked_versions(LOCK)
    outside = {str(r): pins.get(canonicalize_name(r.name)) for r in server_requirements()
               if not r.specifier.contains(pins.get(canonicalize_name(r.name), "0"), prereleases=True)}
    assert outside == {}, "constraints/serve.txt is out of date: regenerate it with the command in its header"


def test_the_lock_says_how_it_was_made_and_the_readme_uses_it():
    command = re.search(r"^#\s+(uv pip compile .*)$", LOCK.read_text(), re.M)
    assert command and "--extra serve" in command.group(1) and "--extra openvino" in command.group(1)
    readme = (ROOT / "README.md").read_text()
    assert "-c constraints/serve.txt" in readme and command.group(1) in readme
