#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: service_info
short_description: List the services of a cloudlet, or get one
version_added: 0.1.0
description:
  - Reads services from a cloudlet controller's HTTP API (C(GET /v1/services) and
    C(GET /v1/services/{name})). Changes nothing.
author:
  - cloudlet maintainers (@cloudlet)
extends_documentation_fragment:
  - cloudlet.fleet.controller
  - cloudlet.fleet.controller.attributes
attributes:
  check_mode:
    support: full
    details:
      - This module only reads; it behaves the same in check mode.
  diff_mode:
    support: N/A
    details:
      - This module only reads.
  platform:
    platforms: all
options:
  name:
    description:
      - Name of one service to get. Without it, every service of the cloudlet is listed.
      - A service that does not exist gives an empty RV(services) list, not a failure.
    type: str
seealso:
  - module: cloudlet.fleet.service
"""

EXAMPLES = r"""
- name: List the services of the cloudlet
  cloudlet.fleet.service_info:
    controller_url: http://127.0.0.1:8700
    controller_token: "{{ cloudlet_controller_token }}"
  register: cloudlet_services

- name: Get the echo service
  cloudlet.fleet.service_info:
    controller_url: http://127.0.0.1:8700
    controller_token: "{{ cloudlet_controller_token }}"
    name: echo
  register: echo_info

- name: Fail unless echo runs
  ansible.builtin.assert:
    that:
      - echo_info.services | length == 1
      - echo_info.services[0].state == 'running'
"""

RETURN = r"""
services:
  description:
    - The services, as the controller reports them (the same fields as RV(cloudlet.fleet.service#module:service) returns).
    - With O(name), a list of one service, or empty if it does not exist.
  returned: always
  type: list
  elements: dict
  sample:
    - name: echo
      image: localhost/cloudlet-demo:latest
      port: 7000
      env: {}
      limits: {"cpus": 0.5, "memory_mb": 256}
      state: running
      session_port: 31000
      cloudlet: a
      runtime: podman
      backend: 10.88.0.5:7000
      created: "2026-11-26T06:00:00Z"
cloudlet:
  description: Name of the cloudlet, from the controller's health endpoint.
  returned: always
  type: str
  sample: a
cause:
  description: What went wrong, when the module fails (see cloudlet.fleet.service).
  returned: failure
  type: str
  sample: unauthorized
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.cloudlet.fleet.plugins.module_utils.controller import (
    ControllerClient,
    ControllerError,
    check_name,
    controller_argument_spec,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=controller_argument_spec(name={"type": "str"}),
        supports_check_mode=True,
    )
    client = ControllerClient.from_module(module)
    name = module.params["name"]
    action = "Getting service %r" % name if name else "Listing services"
    try:
        if name:
            check_name("service", name)
            service = client.get_service(name)
            services = [service] if service is not None else []
        else:
            services = client.list_services()
    except ControllerError as err:
        client.fail(module, action, err, changed=False)
    module.exit_json(changed=False, services=services, cloudlet=client.cloudlet_name())


if __name__ == "__main__":
    main()
