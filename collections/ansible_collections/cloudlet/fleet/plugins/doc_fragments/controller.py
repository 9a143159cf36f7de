# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations


class ModuleDocFragment:
    """Options and attribute descriptions shared by every module that talks to a cloudlet controller."""

    DOCUMENTATION = r"""
options:
  controller_url:
    description:
      - Base URL of the cloudlet controller HTTP API, for example V(http://127.0.0.1:8700).
      - The module runs where the task runs. With O(controller_url) pointing at the loopback address,
        run the task on the cloudlet itself. To drive controllers from the control node, delegate the
        task to C(localhost) and use a URL the control node can reach.
      - If not set, the value of the environment variable E(CLOUDLET_CONTROLLER_URL) is used.
    type: str
    required: true
  controller_token:
    description:
      - Bearer token of the controller (the content of the controller's C(token_file)).
      - If not set, the value of the environment variable E(CLOUDLET_CONTROLLER_TOKEN) is used.
      - Keep it in Ansible Vault; it is never logged.
    type: str
    required: true
  validate_certs:
    description:
      - Verify the controller's TLS certificate when O(controller_url) uses C(https).
    type: bool
    default: true
  ca_path:
    description:
      - PEM file of the CA that signed the controller's certificate (the fleet CA the roles create,
        C(fleet-ca.crt) in the credentials directory), for O(validate_certs).
      - If not set, the environment variable E(CLOUDLET_CA_PATH) is used, then the system's CAs.
    type: path
  timeout:
    description:
      - Seconds to wait for one HTTP request to the controller.
      - Creating a service waits until its container accepts connections, so keep this above the
        controller's C(ready_timeout_seconds).
    type: float
    default: 120
"""

    ATTRIBUTES = r"""
options: {}
attributes:
  check_mode:
    description: Can run in C(check_mode) and return changed status prediction without modifying the cloudlet.
  diff_mode:
    description: Returns details on what has changed (or would change in C(check_mode)), when in diff mode.
  platform:
    description: Target OS/families that can be operated against.
    platforms: all
    support: full
    details:
      - The module only needs HTTP access to the controller; it does not depend on the target's OS.
"""
