#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: session
short_description: Issue a session credential for a cloudlet service, or end a session
version_added: 0.1.0
description:
  - With O(state=present), asks the cloudlet controller for a new session credential for the service
    O(name) (C(POST /v1/services/{name}/sessions)) and returns it with the host and port a device
    connects to. Every run issues a new credential, yet the task reports C(changed=false), because
    a credential is verified by its MAC alone, so issuing one changes nothing on the cloudlet (nothing
    is stored until a device attaches with it). Ending a session is a change.
  - With O(state=absent), ends the session of the credential O(session) (C(DELETE /v1/sessions/{credential})),
    wherever the device is attached; its credential is refused afterwards. A credential without a live
    session (already ended, or never used) reports C(changed=false).
  - The returned RV(session) is a secret; anyone holding it can attach to the session. Register the
    result only where needed, and set the C(no_log) keyword on tasks that print or template it.
author:
  - cloudlet maintainers (@cloudlet)
extends_documentation_fragment:
  - cloudlet.fleet.controller
  - cloudlet.fleet.controller.attributes
attributes:
  check_mode:
    support: full
    details:
      - With O(state=present), checks that the service exists and issues nothing; RV(session) is not returned.
      - With O(state=absent), ends nothing and predicts C(changed), since the controller offers no way to
        look a session up without ending it.
  diff_mode:
    support: none
  platform:
    platforms: all
options:
  name:
    description:
      - Service the session is for. Required when O(state=present).
    type: str
  state:
    description:
      - V(present) issues a new session credential.
      - V(absent) ends the session of O(session).
    type: str
    choices: [present, absent]
    default: present
  session:
    description:
      - The session credential to end. Required when O(state=absent).
    type: str
seealso:
  - module: cloudlet.fleet.service
"""

EXAMPLES = r"""
- name: Issue a session for the echo service
  cloudlet.fleet.session:
    controller_url: http://127.0.0.1:8700
    controller_token: "{{ cloudlet_controller_token }}"
    name: echo
  register: echo_session
  no_log: true

- name: Hand the credential to the device (kept out of the log)
  ansible.builtin.copy:
    content: "{{ echo_session.session }}\n"
    dest: /etc/device/echo.credential
    mode: "0600"
  no_log: true

- name: End the session
  cloudlet.fleet.session:
    controller_url: http://127.0.0.1:8700
    controller_token: "{{ cloudlet_controller_token }}"
    state: absent
    session: "{{ echo_session.session }}"
"""

RETURN = r"""
session:
  description:
    - The session credential (C(v2.<service>.<anchor>.<device>.<issued>.<nonce>.<mac>)). A secret.
  returned: when O(state=present), not in check mode
  type: str
  sample: v2.echo.a..1764136800.q3J0V1pX3k9s2Q0xWm8yTg.4mJ7Y2pQn2x1Vt0bZcR9aw
id:
  description: Session ID (the credential's nonce), as used in logs and metrics. Not a secret.
  returned: when O(state=present), not in check mode
  type: str
  sample: q3J0V1pX3k9s2Q0xWm8yTg
service:
  description: Service of the session.
  returned: when O(state=present)
  type: str
  sample: echo
host:
  description: Host a device connects to with the credential.
  returned: when O(state=present), not in check mode
  type: str
  sample: 192.0.2.10
port:
  description: Port a device connects to (the service's session port).
  returned: when O(state=present), not in check mode
  type: int
  sample: 31000
cloudlet:
  description: Name of the cloudlet.
  returned: always
  type: str
  sample: a
cause:
  description: What went wrong, when the module fails (see cloudlet.fleet.service).
  returned: failure
  type: str
  sample: not_found
"""

import typing as t

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cloudlet.fleet.plugins.module_utils.controller import (
    ControllerClient,
    ControllerError,
    check_name,
    controller_argument_spec,
)


def session_id(credential: str) -> str | None:
    """The nonce of ``v2.<service>.<anchor>.<device>.<issued>.<nonce>.<mac>``, or None for another shape."""
    parts = credential.split(".")
    return parts[5] if len(parts) == 7 and parts[0] == "v2" else None


def issue(module: AnsibleModule, client: ControllerClient, name: str) -> dict[str, t.Any]:
    check_name("service", name)
    if module.check_mode:
        if client.get_service(name) is None:
            raise ControllerError("not_found", "service %r does not exist" % name, 404)
        return {"changed": False, "service": name}
    answer = client.create_session(name)
    credential = answer["session"]
    return {
        "changed": False,  # nothing on the cloudlet changed (module DOCUMENTATION)
        "session": credential,
        "id": answer.get("id") or session_id(credential),
        "service": answer.get("service", name),
        "host": answer.get("host"),
        "port": answer.get("port"),
    }


def end(module: AnsibleModule, client: ControllerClient, credential: str) -> dict[str, t.Any]:
    if module.check_mode:
        return {"changed": True}
    # 404: the session already ended (or never had a live connection): nothing to do.
    return {"changed": client.end_session(credential)}


def main() -> None:
    module = AnsibleModule(
        argument_spec=controller_argument_spec(
            name={"type": "str"},
            state={"type": "str", "choices": ["present", "absent"], "default": "present"},
            session={"type": "str", "no_log": True},
        ),
        supports_check_mode=True,
        required_if=[("state", "present", ("name",)), ("state", "absent", ("session",))],
    )
    client = ControllerClient.from_module(module)
    params = module.params
    if params["state"] == "present":
        action = "Issuing a session for service %r" % params["name"]
    else:
        action = "Ending session %s" % (session_id(params["session"]) or "(unparsable credential)")
    try:
        if params["state"] == "present":
            result = issue(module, client, params["name"])
        else:
            result = end(module, client, params["session"])
    except ControllerError as err:
        client.fail(module, action, err, changed=False)
    result["cloudlet"] = client.cloudlet_name()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
