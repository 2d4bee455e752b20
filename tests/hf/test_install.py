"""The package installs beside a user's stock stack: `pip install '.[hf]'` (how `make venv-hf5` installs it, with
its dependencies) keeps the environment's transformers, and every requirement of the `[hf]` extra is met there."""
import importlib.metadata as metadata
import os
import sysconfig

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _installed():
    """The distribution installed into this environment's site-packages (not the egg-info that an editable install
    leaves in the checkout, which PYTHONPATH or the working directory would find first)."""
    found = list(metadata.distributions(name="llava-dsl", path=[sysconfig.get_paths()["purelib"]]))
    return found[0] if found else None


pytestmark = pytest.mark.skipif(_installed() is None, reason="llava-dsl is installed in .venv-hf5 only (.venv-hf "
                                                               "imports it through PYTHONPATH)")


def _pins(path):
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                out[req.name] = str(req.specifier).lstrip("=")
    return out


def _requirements():
    return [Requirement(r) for r in (_installed().requires or [])]


def test_core_requirements_pin_no_front_door_stack():
    core = [r for r in _requirements() if r.marker is None]
    names = {r.name for r in core}
    assert "torch" in names
    assert not names & {"transformers", "tokenizers", "peft", "accelerate", "deepspeed", "trl"}, sorted(names)


def test_the_hf_extra_is_met_by_the_environment_it_was_installed_into():
    hf = [r for r in _requirements() if r.marker is not None and r.marker.evaluate({"extra": "hf"})]
    assert {r.name for r in hf} >= {"transformers", "trl", "peft", "accelerate", "datasets"}
    for req in hf:
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req} is not met by the installed {version}"


def test_installing_llava_dsl_hf_left_the_pinned_transformers_in_place():
    pins = _pins(os.path.join(ROOT, "scripts", "hf_env5", "constraints.txt"))
    for name in ("transformers", "trl", "peft", "accelerate", "torch"):
        assert SpecifierSet(f"=={pins[name]}").contains(metadata.version(name)), (name, metadata.version(name))
