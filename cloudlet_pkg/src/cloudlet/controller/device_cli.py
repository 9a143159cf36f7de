"""``cloudlet device issue|list|revoke``: device credentials on one cloudlet, with the admin token.

For a whole fleet use the ``cloudlet.fleet.device`` module (``playbooks/devices.yml``): it registers
the same credential on every cloudlet. Here the secret is made locally, only its SHA-256 goes to the
controller, and the credential is printed once (or written to ``--out``, mode 0600).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from cloudlet.controller.devices import digest, make_token, new_secret


def _client(args: argparse.Namespace) -> tuple[str, dict[str, str], ssl.SSLContext | bool]:
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"cloudlet device: cannot read the admin token {args.token_file}: {exc.strerror}") from None
    ctx: ssl.SSLContext | bool = True
    if args.ca_file:
        ctx = ssl.create_default_context(cafile=args.ca_file)
    return args.controller.rstrip("/"), {"Authorization": f"Bearer {token}"}, ctx


async def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    url, headers, ctx = _client(args)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.request(method, url + path, json=body, ssl=ctx) as resp:
                data = await resp.read()
                return resp.status, (json.loads(data) if data else None)
    except (aiohttp.ClientError, OSError) as exc:
        raise SystemExit(f"cloudlet device: cannot reach the controller at {url}: {exc}") from None


def _fail(status: int, body: Any) -> int:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    print(f"cloudlet device: {status} {err.get('code', '')}: {err.get('message', body)}", file=sys.stderr)
    return 1


async def _issue(args: argparse.Namespace) -> int:
    secret = new_secret()
    expires = int(time.time() + args.days * 86400)
    body = {"sha256": digest(secret), "services": args.service, "expires": expires, "description": args.description}
    status, answer = await _call(args, "PUT", f"/v1/devices/{args.device}", body)
    if status not in (200, 201):
        return _fail(status, answer)
    token = make_token(args.device, secret)
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        print(f"device {args.device}: {answer['result']}, credential written to {args.out} (mode 0600), "
              f"services {', '.join(answer['services'])}, expires {time.strftime('%Y-%m-%d', time.gmtime(expires))}",
              file=sys.stderr)
    else:
        print(token)  # shown once: only its hash is kept
    return 0


async def _list(args: argparse.Namespace) -> int:
    status, answer = await _call(args, "GET", "/v1/devices")
    if status != 200:
        return _fail(status, answer)
    devices = answer["devices"]
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    print(f"{'device':<24} {'state':<8} {'expires':<11} services")
    now = time.time()
    for d in devices:
        state = "revoked" if d["revoked"] else "expired" if d["expires"] < now else "active"
        print(f"{d['device']:<24} {state:<8} {time.strftime('%Y-%m-%d', time.gmtime(d['expires'])):<11} "
              f"{', '.join(d['services'])}")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    status, answer = await _call(args, "DELETE", f"/v1/devices/{args.device}")
    if status != 204:
        return _fail(status, answer)
    print(f"device {args.device} revoked on this cloudlet (its sessions here end; revoke on every cloudlet with "
          "playbooks/devices.yml)", file=sys.stderr)
    return 0


def _cmd(args: argparse.Namespace) -> int:
    if args.action is None:
        args.parser.print_help()
        return 2
    return asyncio.run({"issue": _issue, "list": _list, "revoke": _revoke}[args.action](args))


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "device", help="issue, list and revoke device credentials on one cloudlet (admin token)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controller", default="http://127.0.0.1:8701",
                        help="the controller API (default http://127.0.0.1:8701, its loopback listener)")
    parser.add_argument("--token-file", default="/etc/cloudlet/controller.token", help="the admin token")
    parser.add_argument("--ca-file", default="", help="the fleet CA, for an https controller")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    issue = sub.add_parser("issue", help="make a credential for a device and register it here")
    issue.add_argument("device", help="device id (1-32 of a-z, 0-9, -)")
    issue.add_argument("--service", action="append", required=True,
                       help="a service the device may use (repeat; \"*\" for all)")
    issue.add_argument("--days", type=float, default=90, help="validity in days (default 90)")
    issue.add_argument("--description", default="", help="free text, for the operator")
    issue.add_argument("--out", help="write the credential to this file (0600) instead of printing it")
    lst = sub.add_parser("list", help="the devices registered here (no secrets)")
    lst.add_argument("--json", action="store_true")
    revoke = sub.add_parser("revoke", help="revoke a device here (kept, refused, until it expires)")
    revoke.add_argument("device")
    parser.set_defaults(func=_cmd, parser=parser, action=None)
