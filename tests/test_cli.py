"""The `cloudlet` console script is installed and dispatches to every component."""

import subprocess
import sys

import cloudlet


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudlet", *args], capture_output=True, text=True, timeout=60)


def test_version_matches_package() -> None:
    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cloudlet {cloudlet.__version__}"


def test_no_command_prints_help_and_fails() -> None:
    out = run()
    assert out.returncode == 2
    assert "usage: cloudlet" in out.stdout


def test_the_version_is_derived_from_the_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Any change to a file of the package changes the version (what `cloudlet --version`, the
    daemons' /v1/health and cloudlet_build_info show), caches do not."""
    import re
    import shutil
    from pathlib import Path

    import cloudlet_bench
    from cloudlet import _version

    assert re.fullmatch(r"\d+\.\d+\.\d+\+src\.[0-9a-f]{12}", cloudlet.__version__)
    assert cloudlet.__version__.startswith(cloudlet_bench.__version__ + "+")  # the bench measures this release
    copy = tmp_path / "cloudlet"
    shutil.copytree(Path(cloudlet.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _version.source_hash(copy) == cloudlet.__version__.rsplit(".", 1)[1]
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert _version.source_hash(copy) == cloudlet.__version__.rsplit(".", 1)[1]
    (copy / "relay" / "core.py").write_text((copy / "relay" / "core.py").read_text() + "\n# a change\n")
    assert _version.source_hash(copy) != cloudlet.__version__.rsplit(".", 1)[1]
