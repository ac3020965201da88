"""bench/bench_gateway.py --enforcement (bench/README.md, "Enforcement against
none") runs as documented, bounded: two gateways, the volume checks on in
Redis for c+, and the run is marked invalid (exit 4) if c+'s counters left
Redis during it (as a Redis error once made them, unseen). A figure is not
asserted: speed is measured by the benchmark, not by tests."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, need, tcp_reachable


def test_enforcement_benchmark_runs_both_gateways_on_redis(tmp_path):
    need(tcp_reachable("127.0.0.1", 6379), "Redis is not reachable at 127.0.0.1:6379")
    before = set((REPO / "bench" / "results").glob("bench-*.json"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gateway.py"), "--enforcement", "-n", "60", "--reps", "1",
         "--warmup", "10", "--concurrency", "2", "--targets", "c,c+", "--total-timeout", "120"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "c gateway, enforcement off" in out and "c+ gateway, enforcement on (Redis)" in out
    assert "enforcement costs" in out and "c+/c = " in out
    assert "INVALID" not in out
    made = set((REPO / "bench" / "results").glob("bench-*.json")) - before
    assert len(made) == 1
    data = json.loads(next(iter(made)).read_text())
    for p in made:
        p.unlink()
    runs = {r["target"]: r for r in data["runs"]}
    assert runs["c"]["messages"] == runs["c+"]["messages"] == 60
