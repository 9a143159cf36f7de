#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) cloudlet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image
short_description: Put a container image from an archive into a cloudlet's podman, or remove it
version_added: 0.3.0
description:
  - Loads the image O(name) from the archive O(archive) on the node (what C(podman save) writes, a
    docker-archive or an oci-archive) into the node's podman through its API socket, so that the
    cloudlet controller can start services from it. The controller never pulls.
  - Idempotent by image ID. The ID is read from the archive (its image config's digest) and compared
    with the ID podman has for O(name); an image that is already there is not loaded again.
  - The archive is streamed to podman, never read into memory.
  - Only the podman runtime. For k3s, place the archive in k3s's airgap image directory
    (C(/var/lib/rancher/k3s/agent/images/)), which k3s imports at its start.
author:
  - cloudlet maintainers (@cloudlet)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - Reads the archive and asks podman, loads and removes nothing, and predicts C(changed).
      - An archive that is not on the node yet (a copy task before this one would put it there) is
        predicted to be loaded.
  diff_mode:
    support: none
  platform:
    support: full
    platforms: posix
options:
  name:
    description:
      - The image reference, as the archive names it and as services will use it, for example
        V(localhost/app:1.2). Must be one of the archive's tags.
    type: str
    required: true
  archive:
    description:
      - Path of the image archive on the node. Required when O(state=present).
    type: path
  state:
    description:
      - V(present) loads the image unless podman has it with the archive's ID already.
      - V(absent) removes the image O(name) from podman (not the archive).
    type: str
    choices: [present, absent]
    default: present
  podman_socket:
    description:
      - The podman API socket on the node (the one the controller uses, C(cloudlet_podman_socket)).
    type: path
    default: /run/podman/podman.sock
  timeout:
    description:
      - Seconds to wait for podman; a large archive takes as long as podman needs to unpack it.
    type: float
    default: 600
seealso:
  - module: cloudlet.fleet.service
"""

EXAMPLES = r"""
- name: Copy the image archive to the cloudlet
  ansible.builtin.copy:
    src: build/app-1.2.tar
    dest: /var/lib/cloudlet/images/app-1.2.tar
    mode: "0644"

- name: Load it into the cloudlet's podman
  cloudlet.fleet.image:
    name: localhost/app:1.2
    archive: /var/lib/cloudlet/images/app-1.2.tar
"""

RETURN = r"""
image:
  description: The image podman holds for O(name) after the task (not in check mode for a load).
  returned: when O(state=present)
  type: dict
  contains:
    name:
      description: The reference.
      type: str
    id:
      description: The image ID (hex of the image config's sha256 digest), the same on every cloudlet.
      type: str
loaded:
  description: Whether the archive was loaded (or, in check mode, would be).
  returned: always
  type: bool
"""

import http.client
import json
import os
import socket
import tarfile
from urllib.parse import quote

from ansible.module_utils.basic import AnsibleModule

API = "/v4.0.0/libpod"


class _Unix(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class PodmanError(Exception):
    pass


def _call(module, method, path, body=None, headers=None):
    conn = _Unix(module.params["podman_socket"], module.params["timeout"])
    try:
        conn.request(method, API + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise PodmanError("podman API at %s: %s" % (module.params["podman_socket"], exc))
    finally:
        conn.close()
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = None
    return resp.status, parsed, data


def archive_image(path, name):
    """(image id, tags) of the archive at ``path``: docker-archive (manifest.json) or oci-archive (index.json)."""
    with tarfile.open(path) as tar:
        names = set(tar.getnames())

        def read(member):
            fh = tar.extractfile(member)
            if fh is None:
                raise ValueError("%s: no file %s in the archive" % (path, member))
            return json.loads(fh.read())

        if "manifest.json" in names:
            manifest = read("manifest.json")
            for entry in manifest:
                tags = entry.get("RepoTags") or []
                if name in tags or _normal(name) in [_normal(t) for t in tags]:
                    config = entry["Config"]
                    return os.path.basename(config).split(".")[0].replace("sha256:", ""), tags
            all_tags = [t for e in manifest for t in e.get("RepoTags") or []]
            raise ValueError("the archive %s holds %s, not %s" % (path, ", ".join(all_tags) or "no tagged image", name))
        if "index.json" in names:
            index = read("index.json")
            tags = [(m.get("annotations") or {}).get("org.opencontainers.image.ref.name", "")
                    for m in index.get("manifests", [])]
            for m, ref in zip(index.get("manifests", []), tags):
                if ref not in (name, _normal(name)) and _normal(ref) != _normal(name):
                    continue
                digest = m["digest"].split(":", 1)[1]
                inner = read("blobs/sha256/" + digest)
                if inner.get("manifests"):  # an index of manifests: the first one
                    digest = inner["manifests"][0]["digest"].split(":", 1)[1]
                    inner = read("blobs/sha256/" + digest)
                return inner["config"]["digest"].split(":", 1)[1], tags
            raise ValueError("the archive %s holds %s, not %s" % (path, ", ".join(t for t in tags if t) or "no tagged image", name))
    raise ValueError("%s is neither a docker-archive nor an oci-archive (podman save writes them)" % path)


def _normal(ref):
    return ref if "/" in ref.split(":")[0] else "localhost/" + ref


def current_id(module, name):
    status, body, raw = _call(module, "GET", "/images/%s/json" % quote(name, safe=""))
    if status == 404:
        return None
    if status != 200 or not isinstance(body, dict):
        raise PodmanError("podman answered %s to an image inspect: %s" % (status, raw[:300]))
    return str(body.get("Id", "")).replace("sha256:", "")


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            archive=dict(type="path"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            podman_socket=dict(type="path", default="/run/podman/podman.sock"),
            timeout=dict(type="float", default=600.0),
        ),
        required_if=[("state", "present", ["archive"])],
        supports_check_mode=True,
    )
    name, state = module.params["name"], module.params["state"]
    try:
        have = current_id(module, name)
        if state == "absent":
            if have is None or module.check_mode:
                module.exit_json(changed=have is not None, loaded=False)
            status, body, raw = _call(module, "DELETE", "/images/%s" % quote(name, safe=""))
            if status not in (200, 404):
                module.fail_json(msg="podman could not remove %s (%s): %s" % (name, status, raw[:300]), loaded=False)
            module.exit_json(changed=status == 200, loaded=False)
        archive = module.params["archive"]
        if not os.path.isfile(archive):
            if module.check_mode:  # a copy task before this one would put it there
                module.exit_json(changed=True, loaded=True, msg="%s is not on the node yet: it would be loaded" % archive)
            module.fail_json(msg="no image archive at %s on this node" % archive, loaded=False)
        want = archive_image(archive, name)[0]
        if have == want:
            module.exit_json(changed=False, loaded=False, image={"name": name, "id": have})
        if module.check_mode:
            module.exit_json(changed=True, loaded=True, image={"name": name, "id": want})
        with open(archive, "rb") as fh:
            status, body, raw = _call(module, "POST", "/images/load", body=fh,
                                      headers={"Content-Type": "application/x-tar",
                                               "Content-Length": str(os.path.getsize(archive))})
        if status != 200:
            module.fail_json(msg="podman could not load %s (%s): %s" % (archive, status, raw[:300]), loaded=False)
        got = current_id(module, name)
        if got != want:
            module.fail_json(msg="after loading %s, podman has %s as %s, not the archive's %s"
                             % (archive, name, got, want), loaded=True)
        module.exit_json(changed=True, loaded=True, image={"name": name, "id": got})
    except (PodmanError, ValueError, KeyError, tarfile.TarError, OSError) as exc:
        module.fail_json(msg="%s: %s" % (name, exc), loaded=False)


if __name__ == "__main__":
    main()
