"""monitoring/: the alert rules pass promtool (and its rule unit tests), the scrape config is valid,
and every metric the dashboard and the rules query is one a real sessiond and controller export
(scraped from running daemons, themselves checked with ``promtool check metrics``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.controller import Stack
from support.sessiond import start_sessiond_process

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (Debian package prometheus; .ci/install installs it)")
METRIC = re.compile(r"\b(cloudlet_[a-z_]+)\b")
LABELS_ONLY = {"cloudlet_build_info"}  # present by itself, queried as is


def promtool(*args: str, cwd: Path = MON) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


@needs_promtool
def test_the_alert_rules_are_valid_and_fire_as_their_unit_tests_say() -> None:
    checked = promtool("check", "rules", "cloudlet.rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "cloudlet.rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
def test_the_scrape_config_is_valid(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("")
    text = (MON / "prometheus.yml").read_text().replace("/etc/prometheus/cloudlet-fleet-ca.crt", str(tmp_path / "ca.crt"))
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(MON / "cloudlet.rules.yml", tmp_path)
    checked = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def queried_metrics() -> set[str]:
    dashboard = json.loads((MON / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12 and all(p["title"] for p in dashboard["panels"])
    for line in (MON / "cloudlet.rules.yml").read_text().splitlines():
        if line.strip().startswith("expr:") or "cloudlet_" in line and "rate(" in line:
            exprs.append(line)
    return {m for e in exprs for m in METRIC.findall(e)}


async def scrape(url: str, unix: str | None = None) -> str:
    connector = aiohttp.UnixConnector(path=unix) if unix else None
    async with aiohttp.ClientSession(connector=connector) as http, http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.mark.podman
async def test_every_queried_metric_is_exported_by_the_daemons(stack: Stack, tmp_path: Path,
                                                               secret_file: Path) -> None:
    texts = [await scrape("http://sessiond/metrics", stack.sessiond_socket),
             await scrape(stack.controller_url + "/metrics")]
    for name in ("key", "known_hosts"):
        (tmp_path / name).write_text("")
    ssh = {"transport": "ssh", "host": "127.0.0.1", "port": 9, "user": "nobody", "client_key": str(tmp_path / "key"),
           "known_hosts": str(tmp_path / "known_hosts"), "endpoint": "127.0.0.1:7700"}
    with_tunnel = await start_sessiond_process(tmp_path / "s", secret_file, "s", peers={"b": ssh})
    try:
        _, health = await with_tunnel.api("GET", "/v1/health")
        texts.append(await scrape(f"http://{health['metrics_listen']}/metrics"))
    finally:
        with_tunnel.stop()
    families = [f for text in texts for f in text_string_to_metric_families(text)]
    exported = {s.name for f in families for s in f.samples}
    declared = {f.name for f in families}  # a labelled metric nothing has counted yet has no sample, only its family

    def known(metric: str) -> bool:
        return metric in exported or re.sub(r"_(total|bucket|count|sum)$", "", metric) in declared

    missing = sorted(m for m in queried_metrics() if not known(m) and m not in LABELS_ONLY)
    assert not missing, f"queried but exported by no daemon: {missing}"
    if PROMTOOL is not None:
        for text in texts:
            linted = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                                    timeout=60, check=False)
            assert linted.returncode == 0, linted.stdout + linted.stderr
