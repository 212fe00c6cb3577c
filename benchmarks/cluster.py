"""Registrations/s on a 3-node RabbitMQ cluster beside a single node, in the same run (issue 7).

    python benchmarks/cluster.py                 # 3 rounds of 3000 registrations each way, medians printed
    python benchmarks/cluster.py --rounds 1 -n 1000

Starts a single RabbitMQ node and a 3-node cluster of its own (tests/cluster.py: the installed binaries, free
ports, removed afterwards) and runs `benchmarks/throughput.py` part (a) against each in turn, alternating so that
a busy neighbour hurts both alike: the service gets every node of the broker under test in `AMQP_URL` (on the
cluster every queue is a quorum queue replicated on three nodes), the driver talks to one node. The database is
`DATABASE_URL`'s server (a fresh database per round). It prints figures; it is not a test.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import RabbitCluster  # noqa: E402

RATE = re.compile(r"\(a\) service: \d+ registrations.*?median\s+([0-9.]+) /s")


def one_round(cluster: RabbitCluster, count: int, warmup: int) -> float:
    driver_node = cluster.nodes[-1]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--amqp-url", driver_node.url, "--vhost", "/",
         "--skip", "b", "--skip", "c", "--skip", "d", "--skip", "e", "--rounds", "1", "-n", str(count),
         "--warmup", str(warmup),
         "--env", f"AMQP_URL={cluster.amqp_url}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    found = RATE.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"throughput.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--registrations", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"single node": [], "3-node cluster": []}
    with RabbitCluster(1) as single, RabbitCluster(3) as cluster:
        for n in range(args.rounds):
            for name, broker in (("single node", single), ("3-node cluster", cluster)):
                rate = one_round(broker, args.registrations, args.warmup)
                rates[name].append(rate)
                print(f"round {n + 1}: {name}: {rate:.0f} registrations/s", flush=True)
    print()
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:16} median {statistics.median(values):6.0f} registrations/s  (rounds: {shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
