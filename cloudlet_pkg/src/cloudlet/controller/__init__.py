"""The Cloudlet Controller: launches services by image name and wires them to the session daemon.

``app`` is the HTTP API, ``service`` the logic behind it (create, delete, reconcile), ``runtime``
the container runtimes (podman, kubernetes), ``sessiond_client`` the local sessiond's control API.
"""
