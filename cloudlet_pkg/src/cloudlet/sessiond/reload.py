"""Config reload without a restart (``systemctl reload``, SIGHUP, ``POST /v1/reload``).

A reload reads the config file again and applies it to the running process as one step: peers
(added, removed, changed: the unchanged ones keep their warm tunnel and every channel on it),
limits (for new sessions and connections) and the log level. It touches no live session. A file
that does not validate, or that changes a key only a restart can apply (:data:`RESTART_KEYS`), is
refused as a whole: nothing is applied and the running config stays. docs/sessiond.md, "Reload".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cloudlet.common.admission import Admission
from cloudlet.relay.manager import SessionManager
from cloudlet.relay.splice import AVAILABLE as SPLICE_AVAILABLE
from cloudlet.sessiond.config import RESTART_KEYS, SessiondConfig


class ReloadRefused(Exception):
    """The reload applied nothing: ``code`` is ``bad_config`` or ``restart_required``."""

    def __init__(self, code: str, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.keys = keys


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a new config changes against the running one."""

    changed: tuple[str, ...]  # [sessiond] keys whose value differs
    restart_required: tuple[str, ...]  # those of them a reload cannot apply
    peers_added: tuple[str, ...]
    peers_removed: tuple[str, ...]
    peers_changed: tuple[str, ...]

    @property
    def peers(self) -> bool:
        return bool(self.peers_added or self.peers_removed or self.peers_changed)

    def to_json(self) -> dict[str, Any]:
        return {"changed": list(self.changed), "peers_added": list(self.peers_added),
                "peers_removed": list(self.peers_removed), "peers_changed": list(self.peers_changed)}


def plan(old: SessiondConfig, new: SessiondConfig) -> ReloadPlan:
    a, b = old.model_dump(exclude={"peers"}), new.model_dump(exclude={"peers"})
    changed = tuple(k for k in a if a[k] != b[k])
    return ReloadPlan(
        changed=changed,
        restart_required=tuple(k for k in changed if k in RESTART_KEYS),
        peers_added=tuple(sorted(set(new.peers) - set(old.peers))),
        peers_removed=tuple(sorted(set(old.peers) - set(new.peers))),
        peers_changed=tuple(sorted(n for n in set(old.peers) & set(new.peers) if old.peers[n] != new.peers[n])),
    )


def refuse_restart_keys(p: ReloadPlan) -> None:
    if p.restart_required:
        keys = ", ".join(f"sessiond.{k}" for k in p.restart_required)
        raise ReloadRefused("restart_required",
                            f"{keys} changed: a reload cannot apply {'it' if len(p.restart_required) == 1 else 'them'}; "
                            "nothing was applied (systemctl restart applies the file and hands the sessions over)",
                            p.restart_required)


def _set_admission(admission: Admission, max_open: int, max_pending: int, per_source: int) -> None:
    admission.max_open, admission.max_pending, admission.max_pending_per_source = max_open, max_pending, per_source


def apply_limits(manager: SessionManager, cfg: SessiondConfig, log_level: bool = True) -> None:
    """The limits of ``cfg`` for what starts from now on; live sessions keep the ones they started with."""
    max_open, max_pending, per_source = cfg.admission_limits()
    manager.grace_seconds = float(cfg.grace_seconds)
    manager.buffer_bytes = int(cfg.buffer_bytes)
    manager.replay_bytes = int(cfg.replay_bytes)
    manager.max_sessions = int(cfg.max_sessions)
    manager.max_sessions_per_device = int(cfg.max_sessions_per_device)
    manager.header_timeout = float(cfg.header_timeout_seconds)
    manager.backend_connect_timeout = float(cfg.backend_connect_timeout_seconds)
    manager.splice_threshold = None if int(cfg.splice_threshold_bytes) < 0 or not SPLICE_AVAILABLE else int(cfg.splice_threshold_bytes)
    manager.held_budget = int(cfg.held_bytes_budget)
    _set_admission(manager.admission, max_open, max_pending, per_source)
    _set_admission(manager.peer_admission, max_open, max_pending, max_pending)
    if log_level:  # only when the file changed it: a --log-level given at start stays otherwise
        logging.getLogger().setLevel(cfg.log_level.upper())
