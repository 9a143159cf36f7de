#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: service
short_description: Ensure a service is present or absent on a cloudlet
version_added: 0.1.0
description:
  - Creates or removes a service (one container plus its session port) on a cloudlet through the
    cloudlet controller's HTTP API (C(PUT) and C(DELETE) C(/v1/services/{name})).
  - Idempotent. The module reads the service first and compares its spec (O(image), O(port), O(env),
    O(limits)) with the requested one. It sends nothing when they are equal, creates the service when
    it is missing, and fails with the controller's conflict message when the spec differs, unless
    O(recreate=true).
  - Creating waits until the container accepts connections on O(port) (the controller's
    C(ready_timeout_seconds)). If the controller cannot start it (unknown image, runtime down, port
    never ready), the controller removes what it created and the module fails; nothing is left
    half-created.
  - Needs only what ansible-core ships with; the cloudlet Python package is not needed where the
    module runs.
author:
  - cloudlet maintainers (@cloudlet)
extends_documentation_fragment:
  - cloudlet.fleet.controller
  - cloudlet.fleet.controller.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reads the service and predicts the result without creating or removing anything.
      - A spec conflict fails in check mode too, as it would in a real run.
  diff_mode:
    support: full
    details:
      - The diff shows the service spec (image, port, env, limits) before and after.
  platform:
    platforms: all
options:
  name:
    description:
      - Name of the service, unique on its cloudlet.
      - The same name on several cloudlets means the same application; devices moving between
        cloudlets reach their session through the service of that name.
      - Must match C([a-z0-9][a-z0-9-]{0,31}).
    type: str
    required: true
  state:
    description:
      - V(present) creates the service if it does not exist.
      - V(absent) removes the service and its container; its sessions end.
    type: str
    choices: [present, absent]
    default: present
  image:
    description:
      - Container image of the service, for example V(localhost/cloudlet-demo:latest).
      - The image must already exist in the cloudlet's container runtime; an unknown image fails with
        cause C(image_not_found).
      - Required when O(state=present).
    type: str
  port:
    description:
      - TCP port the service listens on inside its container.
      - Devices do not use this port; they use the returned RV(service.session_port) of the cloudlet's
        session daemon.
      - Required when O(state=present).
    type: int
  env:
    description:
      - Environment variables of the container. Values are passed as strings.
    type: dict
    default: {}
  limits:
    description:
      - Resource limits of the container. Unset limits are left to the runtime.
    type: dict
    default: {}
    suboptions:
      cpus:
        description:
          - CPU share, for example V(0.5) for half a core.
        type: float
      memory_mb:
        description:
          - Memory limit in MiB.
        type: int
  recreate:
    description:
      - What to do when the service exists with a different spec.
      - V(false) fails with cause C(conflict) and the controller's message; the running service and its
        sessions are untouched.
      - V(true) removes the service (its sessions end) and creates it with the new spec. If the new
        spec cannot start (for example an unknown image), the service stays removed and the module
        fails.
    type: bool
    default: false
notes:
  - Errors name the cloudlet (its controller URL and, when the controller answers C(/v1/health), its
    name) and the cause; the result has RV(cause), one of C(unreachable), C(timeout), C(unauthorized),
    C(image_not_found), C(conflict), C(limit), C(bad_request), C(runtime_unavailable), C(sessiond_unavailable),
    C(no_free_port), C(port_timeout), C(service_failed),
    C(internal), C(tls), C(bad_response), C(invalid_name).
seealso:
  - module: cloudlet.fleet.service_info
  - module: cloudlet.fleet.session
"""

EXAMPLES = r"""
- name: Run the demo echo service on the cloudlet
  cloudlet.fleet.service:
    controller_url: http://127.0.0.1:8700
    controller_token: "{{ cloudlet_controller_token }}"
    name: echo
    image: localhost/cloudlet-demo:latest
    port: 7000
    env:
      GREETING: hello
    limits:
      cpus: 0.5
      memory_mb: 256
  register: echo

- name: Show the port devices connect to
  ansible.builtin.debug:
    msg: "echo listens for sessions on port {{ echo.service.session_port }}"

- name: Move the service to a new image, ending its sessions
  cloudlet.fleet.service:
    controller_url: http://127.0.0.1:8700
    controller_token: "{{ cloudlet_controller_token }}"
    name: echo
    image: localhost/cloudlet-demo:v2
    port: 7000
    recreate: true

- name: Remove the service from every cloudlet, driven from the control node
  cloudlet.fleet.service:
    controller_url: "http://{{ ansible_host }}:8700"
    controller_token: "{{ cloudlet_controller_token }}"
    name: echo
    state: absent
  delegate_to: localhost
"""

RETURN = r"""
service:
  description:
    - The service as the controller reports it after the task.
    - Empty when O(state=absent).
    - In check mode, when the service would be created, the requested spec with RV(service.state) and
      RV(service.session_port) set to V(null).
  returned: always
  type: dict
  contains:
    name:
      description: Service name.
      type: str
      sample: echo
    image:
      description: Container image.
      type: str
      sample: localhost/cloudlet-demo:latest
    port:
      description: Port inside the container.
      type: int
      sample: 7000
    env:
      description: Environment of the container.
      type: dict
      sample: {"GREETING": "hello"}
    limits:
      description: Resource limits.
      type: dict
      sample: {"cpus": 0.5, "memory_mb": 256}
    state:
      description: V(running), V(starting) or V(failed).
      type: str
      sample: running
    session_port:
      description: Port of the cloudlet's session daemon where devices reach this service.
      type: int
      sample: 31000
    session_host:
      description: Host devices connect to for sessions.
      type: str
      sample: 192.0.2.10
    cloudlet:
      description: Name of the cloudlet.
      type: str
      sample: a
    runtime:
      description: Container runtime of the cloudlet (V(podman) or V(kubernetes)).
      type: str
      sample: podman
    backend:
      description: Address of the container as the session daemon reaches it.
      type: str
      sample: 10.88.0.5:7000
    created:
      description: When the service was created (UTC, ISO 8601).
      type: str
      sample: "2026-11-26T06:00:00Z"
cloudlet:
  description: Name of the cloudlet, from the controller's health endpoint.
  returned: always
  type: str
  sample: a
cause:
  description: What went wrong, when the module fails; see the notes for the values.
  returned: failure
  type: str
  sample: image_not_found
"""

import typing as t

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cloudlet.fleet.plugins.module_utils.controller import (
    ControllerClient,
    ControllerError,
    check_name,
    controller_argument_spec,
    normalize_spec,
    spec_differences,
)


def argument_spec() -> dict[str, dict[str, t.Any]]:
    return controller_argument_spec(
        name={"type": "str", "required": True},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
        image={"type": "str"},
        port={"type": "int"},
        env={"type": "dict", "default": {}},
        limits={
            "type": "dict",
            "default": {},
            "options": {
                "cpus": {"type": "float"},
                "memory_mb": {"type": "int"},
            },
        },
        recreate={"type": "bool", "default": False},
    )


def requested_spec(params: dict[str, t.Any]) -> dict[str, t.Any]:
    """The body of ``PUT /v1/services/{name}``."""
    spec = normalize_spec(params)
    return {"image": spec["image"], "port": spec["port"], "env": spec["env"], "limits": spec["limits"]}


class ServiceTask:
    """One run of the module: read, compare, then create, recreate or remove."""

    def __init__(self, module: AnsibleModule, client: ControllerClient) -> None:
        self.module = module
        self.client = client
        self.name: str = module.params["name"]
        self.result: dict[str, t.Any] = {"changed": False, "service": {}, "cloudlet": None}

    def run(self) -> dict[str, t.Any]:
        check_name("service", self.name)
        current = self.client.get_service(self.name)
        if self.module.params["state"] == "present":
            self.ensure_present(current)
        else:
            self.ensure_absent(current)
        self.result["cloudlet"] = self.client.cloudlet_name()
        return self.result

    def set_diff(self, before: dict[str, t.Any], after: dict[str, t.Any]) -> None:
        if self.module._diff:
            self.result["diff"] = {"before": before, "after": after}

    def ensure_present(self, current: dict[str, t.Any] | None) -> None:
        desired = requested_spec(self.module.params)
        before = normalize_spec(current) if current is not None else {}
        if current is not None:
            differences = spec_differences(before, desired)
            if not differences:
                self.result["service"] = current
                return
            if not self.module.params["recreate"]:
                self.conflict(current, desired, differences)
                return
        self.set_diff(before, desired)
        if self.module.check_mode:
            self.result["changed"] = True
            self.result["service"] = dict(desired, name=self.name, state=None, session_port=None)
            return
        if current is not None:
            # recreate: from here on the old service is gone, even if the new one fails to start.
            self.result["changed"] = self.client.delete_service(self.name)
        created, service = self.client.put_service(self.name, desired)
        self.result["service"] = service
        # Not created: someone else created the same spec between our GET and PUT.
        self.result["changed"] = self.result["changed"] or created

    def conflict(self, current: dict[str, t.Any], desired: dict[str, t.Any], differences: list[str]) -> None:
        """A different spec: let the controller say why (409), or predict it in check mode."""
        detail = "service %r exists with a different %s (set recreate=true to replace it)" % (
            self.name,
            ", ".join(differences),
        )
        if not self.module.check_mode:
            try:
                created, service = self.client.put_service(self.name, desired)
            except ControllerError as err:
                if err.cause != "conflict":
                    raise
                raise ControllerError("conflict", "%s; %s" % (err.detail, detail), err.status) from None
            # The controller considers the specs equal (it normalizes them the same way).
            self.result["service"] = service
            self.result["changed"] = created
            return
        raise ControllerError("conflict", detail, 409)

    def ensure_absent(self, current: dict[str, t.Any] | None) -> None:
        if current is None:
            return
        self.set_diff(normalize_spec(current), {})
        if self.module.check_mode:
            self.result["changed"] = True
            return
        # False if someone else removed it between our GET and DELETE.
        self.result["changed"] = self.client.delete_service(self.name)


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
        required_if=[("state", "present", ("image", "port"))],
    )
    client = ControllerClient.from_module(module)
    task = ServiceTask(module, client)
    action = "%s service %r" % ("ensuring" if module.params["state"] == "present" else "removing", module.params["name"])
    try:
        result = task.run()
    except ControllerError as err:
        client.fail(module, action.capitalize(), err, changed=task.result["changed"], service=task.result["service"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
