"""The machine's cost of one hop between two processes on different cores that were idle: a ping-pong over a unix
socket pair with a pause before each round trip, as between the stack's hops (a request to RabbitMQ, Redis or XO
and its answer). On bare metal a round trip costs tens of microseconds; in a VM, waking a halted virtual CPU goes
through the hypervisor and can cost a millisecond. Every hop of a migrating attach pays it, so the latency
figures move with it: the benchmarks print it with the machine, beside one core's speed.

    .venv/bin/python -m bench.wakeup          # prints p50 and p99 in microseconds
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

ROUNDS = 400
PAUSE_S = 0.001


def measure(rounds: int = ROUNDS, pause_s: float = PAUSE_S) -> tuple[float, float]:
    """(p50, p99) round trip in microseconds, this process on one core and a forked echo on another (the same core
    when the machine has one). Call it only from a process without threads: it forks."""
    cores = sorted(os.sched_getaffinity(0))
    ours, theirs = cores[0], cores[-1]
    here, there = socket.socketpair()
    child = os.fork()
    if child == 0:  # the echo: answers each byte until the socket closes
        here.close()
        os.sched_setaffinity(0, {theirs})
        while data := there.recv(1):
            there.send(data)
        os._exit(0)
    there.close()
    try:
        os.sched_setaffinity(0, {ours})
        trips = []
        for _ in range(rounds):
            time.sleep(pause_s)  # both cores go idle, as between two hops of the stack (not synchronisation)
            started = time.perf_counter()
            here.send(b".")
            here.recv(1)
            trips.append((time.perf_counter() - started) * 1e6)
    finally:
        here.close()
        os.waitpid(child, 0)
    cuts = statistics.quantiles(trips, n=100)
    return cuts[49], cuts[98]


def across_cores() -> str:
    """The figure as the benchmarks print it, measured in a child process (a benchmark runs threads: no fork there)."""
    done = subprocess.run([sys.executable, "-m", "bench.wakeup"], capture_output=True, text=True, check=False,
                          timeout=60)
    if done.returncode != 0:
        return "a wake-up across cores: not measured (" + (done.stderr.strip().splitlines() or ["no output"])[-1] + ")"
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    p50_us, p99_us = measure(args.rounds)
    print(f"a round trip between idle cores {p50_us:.0f} us p50, {p99_us:.0f} us p99")


if __name__ == "__main__":
    main()
