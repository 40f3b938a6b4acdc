#!/usr/bin/env python3
"""Turns the criterion results of `cargo bench -p idem-sqlite --bench claim_complete` into the
Markdown table of docs/benchmarks.md: operations per second, and each store's ratio to the
raw SQLite baseline measured in the same run at the same concurrency."""

import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")


def rate(group, function, param):
    base = root / group / function / str(param) / "new"
    try:
        estimates = json.loads((base / "estimates.json").read_text())
        bench = json.loads((base / "benchmark.json").read_text())
    except FileNotFoundError:
        return None
    per_iter_ns = estimates["mean"]["point_estimate"]
    elements = (bench.get("throughput") or {}).get("Elements", 1)
    return elements * 1e9 / per_iter_ns


def fmt(x):
    return "—" if x is None else f"{x:,.0f}"


def ratio(x, base):
    return "—" if x is None or not base else f"{x / base:.2f}×"


print("| operation | tasks | memory /s | embedded (sqlite) /s | raw SQLite durable insert /s | embedded ÷ raw |")
print("|---|---|---|---|---|---|")
for group in ["claim", "claim_complete"]:
    for tasks in [1, 16, 64]:
        mem = rate(group, "memory", tasks)
        lite = rate(group, "sqlite", tasks)
        raw = rate("claim", "raw-sqlite", tasks)
        print(f"| {group.replace('_', ' + ')} | {tasks} | {fmt(mem)} | {fmt(lite)} | {fmt(raw)} | {ratio(lite, raw)} |")
print()
print("| batch claim | memory ids/s | embedded ids/s |")
print("|---|---|---|")
for size in [100, 1000]:
    print(f"| {size} ids | {fmt(rate('claim_batch', 'memory', size))} | {fmt(rate('claim_batch', 'sqlite', size))} |")
