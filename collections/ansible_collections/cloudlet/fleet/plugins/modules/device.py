#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: device
short_description: Register or revoke a device credential on a cloudlet
version_added: 0.2.0
description:
  - A device credential (C(cd1.<device>.<secret>)) lets one device (or one application) create
    sessions of the services in its scope, read their fleet map and end its own sessions, on every
    cloudlet where it is registered; it cannot use the admin API. See docs/devices.md.
  - The cloudlet stores only the SHA-256 of the secret, with the scope, the expiry and whether the
    device is revoked (C(PUT /v1/devices/{device})). Run the module on every cloudlet of the fleet
    with the same secret (the C(cloudlet.fleet.devices) playbook does) so the credential works
    everywhere.
  - With O(state=revoked), the cloudlet refuses the device from then on (C(DELETE /v1/devices/{device})),
    its sessiond ends the device's live sessions at once and refuses its next attach; no daemon restarts.
  - Idempotent, the current record is read first (C(GET /v1/devices/{device})) and written only if the
    secret, scope, expiry, description or revocation differ.
author:
  - cloudlet maintainers (@cloudlet)
extends_documentation_fragment:
  - cloudlet.fleet.controller
  - cloudlet.fleet.controller.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows scope, expiry, description and revocation, and whether the secret changes;
        never the secret or its hash.
  platform:
    platforms: all
options:
  device:
    description:
      - Device ID, 1 to 32 characters of V(a-z), V(0-9) and V(-) (logged, metered, shown in C(cloudlet device list)).
    type: str
    required: true
    aliases: [name]
  state:
    description:
      - V(present) registers the device (and brings a revoked device back).
      - V(revoked) revokes it; the record stays, refused, so that every sessiond keeps refusing it.
    type: str
    choices: [present, revoked]
    default: present
  secret:
    description:
      - The device secret (the part after C(cd1.<device>.)), 20 to 100 characters of V(A-Z), V(a-z),
        V(0-9), V(-) and V(_). Only its SHA-256 is sent to the cloudlet. Mutually exclusive with O(sha256).
    type: str
  sha256:
    description:
      - The hex SHA-256 of the secret, when the secret itself stays elsewhere (for example
        C("{{ secret | hash('sha256') }}") computed on the control node). Mutually exclusive with O(secret).
    type: str
  services:
    description:
      - Services the device may use; V(*) for every service. Required when O(state=present).
    type: list
    elements: str
  expires:
    description:
      - When the credential expires, as a date (V(2027-06-30), meaning 00:00 UTC that day), an ISO 8601
        time with a zone (V(2027-06-30T12:00:00Z)), or Unix seconds. Required when O(state=present).
        The controller refuses an expiry in the past or more than C(device_lifetime_days_max) days away.
    type: str
  description:
    description:
      - Free text for the operator (who holds the device, what it runs), at most 200 characters.
    type: str
    default: ""
notes:
  - A secret is never returned, logged or shown in a diff; O(secret) is C(no_log).
seealso:
  - module: cloudlet.fleet.session
"""

EXAMPLES = r"""
- name: Let the phone use the demo service until the end of June
  cloudlet.fleet.device:
    controller_url: http://127.0.0.1:8701
    controller_token: "{{ cloudlet_controller_token }}"
    device: phone-1
    secret: "{{ lookup('ansible.builtin.file', 'credentials/devices/phone-1.secret') }}"
    services: [demo]
    expires: "2027-06-30"

- name: Revoke it on this cloudlet
  cloudlet.fleet.device:
    controller_url: http://127.0.0.1:8701
    controller_token: "{{ cloudlet_controller_token }}"
    device: phone-1
    state: revoked
"""

RETURN = r"""
device:
  description: The device as registered now (no secret, no hash); absent when there is no record.
  returned: success
  type: dict
  contains:
    device:
      description: Device ID.
      type: str
      sample: phone-1
    services:
      description: The scope, sorted.
      type: list
      elements: str
      sample: [demo]
    expires:
      description: Expiry, Unix seconds.
      type: int
      sample: 1814313600
    revoked:
      description: Whether the device is revoked.
      type: bool
      sample: false
    description:
      description: The operator's text.
      type: str
      sample: Alice's phone
result:
  description: What the cloudlet did (V(created), V(changed), V(unchanged), V(revoked)); predicted in check mode.
  returned: success
  type: str
  sample: created
cloudlet:
  description: Name of the cloudlet.
  returned: always
  type: str
  sample: a
cause:
  description: What went wrong, when the module fails (see cloudlet.fleet.service).
  returned: failure
  type: str
  sample: bad_request
"""

import datetime
import hashlib
import re
import typing as t

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cloudlet.fleet.plugins.module_utils.controller import (
    ControllerClient,
    ControllerError,
    check_name,
    controller_argument_spec,
)

SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SHOWN = ("services", "expires", "description", "revoked")


def parse_expires(value: str) -> int:
    """Unix seconds of a date, an ISO 8601 time with a zone, or Unix seconds."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        if DATE_PATTERN.match(text):
            day = datetime.date.fromisoformat(text)
            return int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp())
        when = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ControllerError(
            "invalid_argument",
            "expires=%r: give a date (2027-06-30), an ISO 8601 time with a zone (2027-06-30T12:00:00Z) "
            "or Unix seconds" % value,
        )
    return int(when.timestamp())


def wanted_hash(params: dict[str, t.Any]) -> str:
    if params["secret"] is not None:
        if not SECRET_PATTERN.match(params["secret"]):
            raise ControllerError(
                "invalid_argument", "secret must be 20 to 100 characters of A-Z, a-z, 0-9, '-' and '_'"
            )
        return hashlib.sha256(params["secret"].encode("ascii")).hexdigest()
    sha = params["sha256"].strip().lower()
    if not SHA256_PATTERN.match(sha):
        raise ControllerError("invalid_argument", "sha256 must be 64 hex digits (the SHA-256 of the secret)")
    return sha


def shown(record: dict[str, t.Any] | None) -> dict[str, t.Any]:
    """What a result and a diff may show of a record: never the hash."""
    if record is None:
        return {}
    out = {key: record.get(key) for key in SHOWN}
    out["device"] = record.get("device")
    out["services"] = sorted(out["services"] or [])
    return out


def present(module: AnsibleModule, client: ControllerClient, device: str) -> dict[str, t.Any]:
    params = module.params
    services = sorted(set(params["services"]))
    if not services:
        raise ControllerError("invalid_argument", "services must name at least one service (or \"*\" for all)")
    for service in services:
        if service != "*":
            check_name("service", service)
    desired = {
        "sha256": wanted_hash(params),
        "services": services,
        "expires": parse_expires(params["expires"]),
        "description": params["description"],
    }
    current = client.get_device(device)
    same = (
        current is not None
        and not current.get("revoked")
        and current.get("sha256") == desired["sha256"]
        and sorted(current.get("services") or []) == services
        and current.get("expires") == desired["expires"]
        and (current.get("description") or "") == desired["description"]
    )
    after = dict(shown(current), device=device, revoked=False, **{k: desired[k] for k in ("services", "expires", "description")})
    result: dict[str, t.Any] = {"changed": not same, "device": shown(current) if same else after}
    if same:
        result["result"] = "unchanged"
    elif module.check_mode:
        result["result"] = "created" if current is None else "changed"
    else:
        result["result"] = client.put_device(device, desired)
        result["changed"] = result["result"] != "unchanged"
    if module._diff:
        before = shown(current)
        if current is not None:
            before["secret"] = "(unchanged)" if current.get("sha256") == desired["sha256"] else "(replaced)"
        result["diff"] = {"before": before, "after": dict(after, secret=before.get("secret", "(new)"))}
    return result


def revoked(module: AnsibleModule, client: ControllerClient, device: str) -> dict[str, t.Any]:
    current = client.get_device(device)
    if current is None:
        return {"changed": False, "result": "unchanged", "device": {}}
    if current.get("revoked"):
        return {"changed": False, "result": "unchanged", "device": shown(current)}
    if not module.check_mode and not client.revoke_device(device):
        return {"changed": False, "result": "unchanged", "device": {}}
    result: dict[str, t.Any] = {"changed": True, "result": "revoked", "device": dict(shown(current), revoked=True)}
    if module._diff:
        result["diff"] = {"before": {"revoked": False}, "after": {"revoked": True}}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec=controller_argument_spec(
            device={"type": "str", "required": True, "aliases": ["name"]},
            state={"type": "str", "choices": ["present", "revoked"], "default": "present"},
            secret={"type": "str", "no_log": True},
            sha256={"type": "str"},
            services={"type": "list", "elements": "str"},
            expires={"type": "str"},
            description={"type": "str", "default": ""},
        ),
        supports_check_mode=True,
        mutually_exclusive=[("secret", "sha256")],
        required_if=[("state", "present", ("services", "expires")), ("state", "present", ("secret", "sha256"), True)],
    )
    client = ControllerClient.from_module(module)
    device = module.params["device"]
    state = module.params["state"]
    action = "Registering device %r" % device if state == "present" else "Revoking device %r" % device
    try:
        check_name("device", device)
        if state == "present" and len(module.params["description"]) > 200:
            raise ControllerError("invalid_argument", "description must be at most 200 characters")
        result = present(module, client, device) if state == "present" else revoked(module, client, device)
    except ControllerError as err:
        client.fail(module, action, err, changed=False)
    result["cloudlet"] = client.cloudlet_name()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
