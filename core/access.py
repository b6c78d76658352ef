"""Who may do what in a shared app (roles from the app's secrets) and which folders a browser may open."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core import config
from core.errors import BinsightError

ROLES = ("viewer", "annotator", "trainer")  # each role can do what the ones before it can
ACTIONS = {
    "browse": "viewer", "evaluate": "viewer", "predict": "viewer",
    "spot_check": "annotator", "relabel": "annotator",
    "train": "trainer", "cancel_job": "trainer", "balance": "trainer", "change_dataset": "trainer",
    "open_folder": "trainer",  # typing a server path (Predict's local folder, a pool folder, another dataset)
}
WHAT = {
    "browse": "browse bins", "evaluate": "evaluate models", "predict": "predict counts",
    "spot_check": "spot-check bins", "relabel": "relabel bins", "train": "launch trainings", "cancel_job": "cancel jobs",
    "balance": "balance the data", "change_dataset": "change the dataset", "open_folder": "open folders on the server",
}
ROOTS_VARIABLE = "BINSIGHT_DATA_ROOTS"
LOCAL_USER = "local user"


class AccessDenied(BinsightError):
    """The signed-in user's role does not allow this action."""


class PathRefused(BinsightError):
    """A path typed in the browser that lies outside the folders the app may open."""


@dataclass(frozen=True)
class User:
    """Who is using the app: a name for the records, and a role (None: sign-in is off, one local user may do all)."""

    name: str
    role: str | None = None

    @property
    def signed_in(self) -> bool:
        return self.role is not None

    def can(self, action: str) -> bool:
        if self.role is None:
            return True
        return ROLES.index(self.role) >= ROLES.index(ACTIONS[action])

    def why_not(self, action: str) -> str | None:
        """None when allowed, else the sentence to show beside the disabled control."""
        if self.can(action):
            return None
        needed = ACTIONS[action]
        article = "an" if needed[0] in "aeiou" else "a"
        return (f"Only {article} {needed} may {WHAT[action]}; you are signed in as {self.name} with the role {self.role}. "
                "Ask an administrator for another role.")

    def require(self, action: str) -> None:
        reason = self.why_not(action)
        if reason:
            raise AccessDenied(reason)


def role_for(email: str | None, roles: Mapping | None) -> str:
    """The role `email` has in the secrets' `[roles]` table: role name → list of emails (or "*"); default viewer.

    Example secrets.toml:  [roles]  trainer = ["lead@example.com"]  annotator = ["*@example.com"]
    """
    email = (email or "").strip().lower()
    best = "viewer" if not roles or "default" not in roles else str(roles["default"])
    if best not in ROLES:
        best = "viewer"
    for role in ROLES:
        members = (roles or {}).get(role) or []
        if isinstance(members, str):
            members = [members]
        for member in members:
            member = str(member).strip().lower()
            matches = member == "*" or member == email or (member.startswith("*@") and email.endswith(member[1:]))
            if matches and ROLES.index(role) > ROLES.index(best):
                best = role
    return best


def data_roots() -> list[Path]:
    """Folders a browser may open: $BINSIGHT_DATA_ROOTS (os.pathsep-separated), else BINSIGHT_DATA, the demo set
    and BINSIGHT_HOME. Each is resolved (symlinks followed)."""
    listed = os.environ.get(ROOTS_VARIABLE, "")
    if listed.strip():
        chosen = [Path(p).expanduser() for p in listed.split(os.pathsep) if p.strip()]
    else:
        chosen = [config.demo_dir(), config.home()]
        if os.environ.get("BINSIGHT_DATA"):
            data = Path(os.environ["BINSIGHT_DATA"]).expanduser()
            chosen.insert(0, data if data.is_dir() else data.parent)
    return [p.resolve() for p in chosen]


def allowed_path(typed: str | Path) -> Path:
    """The typed path resolved (`~`, `..` and symlinks included) when it lies inside a data root; else PathRefused."""
    text = str(typed).strip()
    if not text:
        raise PathRefused("Give a path.")
    resolved = Path(text).expanduser().resolve()
    roots = data_roots()
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return resolved
    listed = ", ".join(str(r) for r in roots)
    raise PathRefused(f"{text} is outside the folders this app may open ({listed}). "
                      f"An administrator can add folders with {ROOTS_VARIABLE}.")
