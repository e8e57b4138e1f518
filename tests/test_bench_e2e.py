"""The benchmark end to end at a tiny size: real dfly, curl and aria2c processes on loopback.

Run alone with C{scripts/test -m bench}.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest

from dfly.devtools import bench

MIB = 1 << 20


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention C{text}."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


@pytest.mark.bench
@pytest.mark.loopback
@pytest.mark.skipif(shutil.which("aria2c") is None or shutil.which("curl") is None, reason="needs aria2c and curl")
def test_bench_runs_every_part_and_leaves_nothing_running(tmp_path: Any) -> None:
    """scripts/bench's machinery at N=2, S=4 MiB, 8 MiB/s caps: all four swarms (dfly with and
    without relays, plain HTTP, BitTorrent) finish with verified copies, dfly's origin sends
    the file once, the single-client and simulator parts report, the
    Markdown, JSON and PNGs are written, and no process it started is still running."""
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    code = bench.main([
        "--peers", "2", "--size", "4M", "--rate", "8M", "--piece-size", "1M", "--single-size", "8M",
        "--sim-peers", "50", "--sim-size", "64M", "--workdir", work, "--out", out,
    ])
    assert code == 0
    with open(os.path.join(out, "bench", "results.json")) as f:
        results = json.load(f)
    runs = {r["system"]: r for r in results["swarm"]}
    assert set(runs) == {"dfly", "dfly-saf", "http", "bt"}, results["swarm"]
    for system in ("dfly", "dfly-saf", "bt"):
        run = runs[system]
        assert run["verified"], run
        assert all(t is not None for t in run["times"]), run
        assert not run["last"]["lower_bound"] and run["last"]["value"] >= run["t_star"] * 0.9
    for system in ("dfly", "dfly-saf"):
        assert runs[system]["origin_bytes"] == 4 * MIB
        assert runs[system]["cdn_bytes"] + runs[system]["peer_bytes"] == 2 * 4 * MIB
    assert runs["http"]["verified"] and runs["http"]["origin_bytes"] > 0
    assert runs["bt"]["origin_bytes"] >= 4 * MIB * 0.9  # the seeder sent at least one copy
    single = results["single"]
    assert "error" not in single, single
    assert single["size"] == 8 * MIB and single["cold_seconds"] > 0 and single["warm_seconds"] > 0
    assert single["peer_vmhwm_max_kib"] > 0 and single["supernode_vmhwm_kib"] > 0
    if bench.sim_available():
        assert results["sim"][0]["peers"] == 50 and "error" not in results["sim"][0], results["sim"]
    else:
        assert results["sim"] == {"error": "not available"}
    doc = open(os.path.join(out, "BENCHMARKS.md")).read()
    assert "## Swarm" in doc and "## Targets" in doc and "last dfly peer" in doc
    for name in ("swarm-time.png", "swarm-bytes.png", "single.png"):
        with open(os.path.join(out, "bench", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert processes_mentioning(work) == []
