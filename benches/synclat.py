#!/usr/bin/env python3
# Usage: python3 benches/synclat.py SIZE COUNT RATE PATH (docs/BENCHMARKS.md, issue 10 `always`).
# Per-call latency of an appending write + fdatasync, paced like the bench (50/s), on the same file system.
import os, sys, time
size = int(sys.argv[1]); count = int(sys.argv[2]); rate = float(sys.argv[3]); path = sys.argv[4]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
buf = os.urandom(size)
lat = []
start = time.monotonic()
for i in range(count):
    due = start + i / rate
    now = time.monotonic()
    if due > now: time.sleep(due - now)
    t0 = time.monotonic_ns()
    os.write(fd, buf); os.fdatasync(fd)
    lat.append((time.monotonic_ns() - t0) / 1e6)
os.close(fd); os.unlink(path)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))]
print(f"{size} B write+fdatasync at {rate:g}/s, {count} calls: p50 {q(50):.3f} p90 {q(90):.3f} p99 {q(99):.3f} p99.9 {q(99.9):.3f} max {lat[-1]:.3f} ms")
