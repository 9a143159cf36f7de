"""`cloudlet image build-demo|build-redis`: build service images locally (no registry needed).

The demo service (``data/demo/demo.c``, protocol in docs/demo-service.md) is compiled as a static
binary with the host's gcc and put into a ``FROM scratch`` image with ``podman build``. The image
carries the hash of its sources in the label ``cloudlet.source-hash``; a second run with unchanged
sources finds that label and does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEMO_IMAGE = "localhost/cloudlet-demo:latest"
REDIS_IMAGE = "localhost/cloudlet-redis:latest"
REDIS_CONTAINERFILE = """# redis-server of this machine and the libraries it links, nothing else (cloudlet image build-redis)
FROM scratch
COPY rootfs/ /
USER 65534:65534
EXPOSE 6379
ENTRYPOINT ["/usr/bin/redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp"]
"""
DEMO_PORT = 7000
SOURCE_LABEL = "cloudlet.source-hash"
_SOURCES = ("demo.c", "Containerfile")


class BuildError(Exception):
    """Building the demo image failed; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    image: str
    source_hash: str
    built: bool  # False: an image with the same source hash already existed
    seconds: float


def demo_source_dir() -> Path:
    return Path(str(resources.files("cloudlet") / "data" / "demo"))


def source_hash(src: Path | None = None) -> str:
    src = src or demo_source_dir()
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return h.hexdigest()[:32]


def podman_env() -> dict[str, str]:
    """The environment for podman: the project's containers.conf (runc, ulimits) unless one is set."""
    env = dict(os.environ)
    default_conf = Path(__file__).resolve().parents[3] / "etc" / "containers.conf"
    if "CONTAINERS_CONF" not in env and default_conf.is_file():
        env["CONTAINERS_CONF"] = str(default_conf)
    return env


def image_source_hash(image: str, podman: str = "podman") -> str | None:
    """The ``cloudlet.source-hash`` label of ``image``, or None if the image does not exist."""
    proc = subprocess.run(
        [podman, "image", "inspect", image], capture_output=True, text=True, env=podman_env()
    )
    if proc.returncode != 0:
        return None
    try:
        info: list[dict[str, Any]] = json.loads(proc.stdout)
        labels = info[0].get("Labels") or (info[0].get("Config") or {}).get("Labels") or {}
    except (ValueError, IndexError, AttributeError):
        return None
    value = labels.get(SOURCE_LABEL)
    return str(value) if value else None


def _run(step: str, cmd: list[str], log: Any) -> None:
    log(f"== {step}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=podman_env())
    if proc.returncode != 0:
        raise BuildError(f"{step} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")


def build_demo(
    image: str = DEMO_IMAGE,
    force: bool = False,
    podman: str = "podman",
    cc: str = "gcc",
    log: Any = None,
) -> BuildResult:
    """Compile the demo service and build ``image``; skip when the same sources are already built."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.monotonic()
    src = demo_source_dir()
    want = source_hash(src)
    if not force and image_source_hash(image, podman) == want:
        log(f"== {image} is up to date (source hash {want})")
        return BuildResult(image, want, False, time.monotonic() - start)
    for tool in (cc, podman):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found; install it (Debian: gcc libc6-dev podman)")
    with tempfile.TemporaryDirectory(prefix="cloudlet-demo-") as tmp:
        ctx = Path(tmp)
        shutil.copy(src / "Containerfile", ctx / "Containerfile")
        _run("compile", [cc, "-static", "-O2", "-pthread", "-o", str(ctx / "cloudlet-demo"), str(src / "demo.c")], log)
        _run(
            "build",
            [podman, "build", "--quiet", "--label", f"{SOURCE_LABEL}={want}", "-t", image, "-f",
             str(ctx / "Containerfile"), str(ctx)],
            log,
        )
    seconds = time.monotonic() - start
    log(f"== built {image} (source hash {want}) in {seconds:.1f} s")
    return BuildResult(image, want, True, seconds)


def _linked_files(binary: str) -> list[str]:
    """``binary`` and every shared object ``ldd`` says it loads (the dynamic loader included)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    files = [binary]
    for line in out.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/") and os.path.exists(part):
                files.append(part)
    return sorted(set(files))


def build_redis(image: str = REDIS_IMAGE, force: bool = False, podman: str = "podman", log: Any = None) -> BuildResult:
    """A real redis service image: this machine's ``redis-server`` and its libraries, ``FROM scratch``.

    For the agent's tests and the demo (``redis-benchmark`` through the agent); skipped when an image
    built from the same binary exists.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.monotonic()
    binary = shutil.which("redis-server")
    if binary is None:
        raise BuildError("redis-server not found; install it (Debian: redis-server)")
    binary = os.path.realpath(binary)
    files = _linked_files(binary)
    h = hashlib.sha256(REDIS_CONTAINERFILE.encode())
    for f in files:
        h.update(f.encode() + b"\0" + Path(f).read_bytes())
    want = h.hexdigest()[:32]
    if not force and image_source_hash(image, podman) == want:
        log(f"== {image} is up to date (source hash {want})")
        return BuildResult(image, want, False, time.monotonic() - start)
    with tempfile.TemporaryDirectory(prefix="cloudlet-redis-") as tmp:
        ctx = Path(tmp)
        for f in files:
            dest = ctx / "rootfs" / f.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        tmpdir = ctx / "rootfs" / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        tmpdir.chmod(0o1777)
        if binary != "/usr/bin/redis-server":
            target = ctx / "rootfs" / "usr" / "bin" / "redis-server"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(binary, target)
        (ctx / "Containerfile").write_text(REDIS_CONTAINERFILE)
        _run("build", [podman, "build", "--quiet", "--label", f"{SOURCE_LABEL}={want}", "-t", image, "-f",
                       str(ctx / "Containerfile"), str(ctx)], log)
    seconds = time.monotonic() - start
    log(f"== built {image} ({len(files)} files) in {seconds:.1f} s")
    return BuildResult(image, want, True, seconds)


def _cmd_build_redis(args: argparse.Namespace) -> int:
    try:
        result = build_redis(args.tag, force=args.force, podman=args.podman)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"cloudlet image build-redis: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"image": result.image, "source_hash": result.source_hash,
                          "built": result.built, "seconds": round(result.seconds, 3)}))
    return 0


def _cmd_build_demo(args: argparse.Namespace) -> int:
    try:
        result = build_demo(args.tag, force=args.force, podman=args.podman, cc=args.cc)
    except BuildError as exc:
        print(f"cloudlet image build-demo: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"image": result.image, "source_hash": result.source_hash,
                          "built": result.built, "seconds": round(result.seconds, 3)}))
    return 0


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "image",
        help="build the images cloudlets run (the demo service, redis)",
        description="Build container images locally; no registry is needed.",
    )
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION")
    build = sub.add_parser(
        "build-demo",
        help=f"compile the demo service and build {DEMO_IMAGE}",
        description=(
            "Compile the demo service (a static C program, see docs/demo-service.md) and build it "
            "into a FROM scratch image with podman. Skips the build when an image with the same "
            f"source hash (label {SOURCE_LABEL}) exists."
        ),
    )
    build.add_argument("--tag", default=DEMO_IMAGE, help=f"image name (default {DEMO_IMAGE})")
    build.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    build.add_argument("--podman", default="podman", help="podman executable (default podman)")
    build.add_argument("--cc", default="gcc", help="C compiler (default gcc)")
    build.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    build.set_defaults(func=_cmd_build_demo)
    redis = sub.add_parser(
        "build-redis", help=f"build {REDIS_IMAGE} from this machine's redis-server",
        description="Put this machine's redis-server and the libraries it links into a FROM scratch image "
        "(a real stateful service for the agent's demo and tests). Skips the build when nothing changed.")
    redis.add_argument("--tag", default=REDIS_IMAGE, help=f"image name (default {REDIS_IMAGE})")
    redis.add_argument("--force", action="store_true", help="rebuild even if the image is up to date")
    redis.add_argument("--podman", default="podman", help="podman executable (default podman)")
    redis.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    redis.set_defaults(func=_cmd_build_redis)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
