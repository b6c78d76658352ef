"""Roles from the app's secrets, and the folders a browser may open (BINSIGHT_DATA_ROOTS)."""
from pathlib import Path

import pytest

from core import access, config
from core.access import AccessDenied, PathRefused, User, allowed_path, role_for

ROLES = {"trainer": ["lead@example.com"], "annotator": ["*@ops.example.com", "Ann@Example.com"]}


def test_roles_come_from_the_secrets_and_default_to_viewer():
    assert role_for("lead@example.com", ROLES) == "trainer"
    assert role_for("picker@ops.example.com", ROLES) == "annotator"
    assert role_for("ann@example.com", ROLES) == "annotator"  # emails compare case-insensitively
    assert role_for("guest@elsewhere.org", ROLES) == "viewer"
    assert role_for("guest@elsewhere.org", {**ROLES, "default": "annotator"}) == "annotator"
    assert role_for("x@y.z", {"trainer": "*"}) == "trainer"


@pytest.mark.parametrize("role, allowed", [
    ("viewer", {"browse", "evaluate", "predict"}),
    ("annotator", {"browse", "evaluate", "predict", "spot_check", "relabel"}),
    ("trainer", set(access.ACTIONS)),
])
def test_each_role_may_do_exactly_its_actions(role, allowed):
    user = User("someone@example.com", role)
    assert {a for a in access.ACTIONS if user.can(a)} == allowed
    for action in set(access.ACTIONS) - allowed:
        assert user.why_not(action).startswith(("Only a ", "Only an ")) and role in user.why_not(action)
        with pytest.raises(AccessDenied):
            user.require(action)


def test_without_sign_in_the_local_user_may_do_everything():
    user = User(access.LOCAL_USER)
    assert not user.signed_in and all(user.can(a) for a in access.ACTIONS)


@pytest.fixture
def roots(tmp_path, monkeypatch) -> Path:
    allowed = tmp_path / "data"
    (allowed / "abid" / "bin-images").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    monkeypatch.setenv(access.ROOTS_VARIABLE, str(allowed))
    return allowed


def test_a_path_inside_a_root_is_allowed_and_resolved(roots):
    assert allowed_path(str(roots / "abid")) == (roots / "abid").resolve()
    assert allowed_path(f"  {roots}/abid/../abid/bin-images  ") == (roots / "abid" / "bin-images").resolve()


@pytest.mark.parametrize("typed", ["{root}/../secret", "{root}/abid/../../secret", "/etc", "/", "~", "~/.ssh"])
def test_paths_outside_the_roots_are_refused(roots, typed):
    with pytest.raises(PathRefused, match="outside the folders this app may open"):
        allowed_path(typed.format(root=roots))


def test_a_symlink_pointing_out_is_refused(roots, tmp_path):
    (roots / "escape").symlink_to(tmp_path / "secret")
    with pytest.raises(PathRefused):
        allowed_path(roots / "escape")


def test_default_roots_are_the_dataset_the_demo_and_home(monkeypatch, tmp_path):
    monkeypatch.delenv(access.ROOTS_VARIABLE, raising=False)
    data = tmp_path / "chosen"
    data.mkdir()
    monkeypatch.setenv("BINSIGHT_DATA", str(data))
    assert access.data_roots() == [data.resolve(), config.demo_dir().resolve(), config.home().resolve()]
    assert allowed_path(config.home() / "runs") == (config.home() / "runs").resolve()
    with pytest.raises(PathRefused):
        allowed_path(tmp_path / "elsewhere")
    with pytest.raises(PathRefused, match="Give a path"):
        allowed_path("   ")
