#!/usr/bin/env python3
"""Turns a bench/gateway run into Markdown tables.

    python3 bench/gateway_report.py target/bench-gateway/<time>             # prints them
    python3 bench/gateway_report.py target/bench-gateway/<time> --doc FILE  # replaces the
        block between the bench/gateway markers in FILE (appends it when they are missing)
"""

import json
import sys
from pathlib import Path

BEGIN = "<!-- bench/gateway: begin (written by bench/gateway; edits inside are overwritten) -->"
END = "<!-- bench/gateway: end -->"

ROWS = {
    "upstream": "upstream, served directly",
    "nginx": "nginx, `proxy_pass` with keep-alive",
    "memory": "idem, memory store",
    "sqlite": "idem, embedded store (SQLite)",
    "sqlite-tmpfs": "idem, embedded store on tmpfs (no disk flush)",
    "postgres": "idem, PostgreSQL store",
    "redis": "idem, Redis store",
    "ipx": "idempotent-proxy-server, Redis",
}
WORKLOADS = {
    "fresh": "Fresh keys: every request executes",
    "replay": "Replays: every request repeats a completed key",
    "mix": "Mix: 80 % fresh keys, 20 % retries of recent keys",
}


def ms(us):
    return f"{us / 1000:.2f} ms"


def ratio(a, b):
    return f"{a / b:.2f}×" if b else "–"


def cpu(row, r):
    """The servers' CPU time per request, in microseconds."""
    if "proxy_cpu_us" not in r:
        return "–"
    if row == "upstream":
        return f"{r['upstream_cpu_us']:.0f} µs (upstream)"
    parts = [r["proxy_cpu_us"], r["upstream_cpu_us"]]
    if row in ("postgres", "redis", "ipx"):
        parts.append(r["store_cpu_us"])
    return " + ".join(f"{p:.0f}" for p in parts) + " µs"


def report(out: Path) -> str:
    machine = json.loads((out / "machine.json").read_text())
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
    by = {(r["row"], r["workload"]): r for r in results}
    lines = []
    m = machine
    lines.append(
        f"Run of {m['date']}: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}. Load generator pinned to core(s) {m['load_cpus']}, every server (the "
        f"upstream, the proxy, PostgreSQL, Redis) to core(s) {m['server_cpus']}. Load average "
        f"(1, 5, 15 min) {m['load_before']} before the run, {m['load_after']} after. A 4 KiB "
        f"write and its `fdatasync` where the embedded store's file lives: p50 "
        f"{m['fsync_ms'][0]} ms, p99 {m['fsync_ms'][1]} ms."
    )
    lines.append("")
    lines.append(
        f"wrk {m['wrk']}, {m['wrk_threads']} thread(s), {m['connections']} connections, "
        f"{m['warmup']} warm-up then {m['duration']} per row and workload; upstream delay "
        f"{m['upstream_delay_ms']} ms. nginx {m['nginx']}, Redis {m['redis']} (no persistence), "
        f"PostgreSQL {m['postgres']} (fsync {m['postgres_fsync']}), idempotent-proxy-server "
        f"{m['ipx']}. Command:"
    )
    lines.append("")
    lines.append("```sh")
    lines.append(m["command"])
    lines.append("```")
    workloads = [w for w in WORKLOADS if any(k[1] == w for k in by)]
    for workload in workloads:
        nginx = by.get(("nginx", workload))
        lines.append("")
        lines.append(f"**{WORKLOADS[workload]}**")
        lines.append("")
        lines.append(
            "| row | requests/s | ÷ nginx | p50 | p99 | p99.9 | upstream calls per request "
            "| errors | server CPU per request: proxy + upstream + store | load generator CPU |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for row, label in ROWS.items():
            r = by.get((row, workload))
            if r is None:
                continue
            errors = int(r["errors"] + r["non2xx"])
            calls = r["upstream_calls"] / r["requests"] if r["requests"] else 0
            lines.append(
                f"| {label} | {r['rps']:,.0f} | {ratio(r['rps'], nginx['rps']) if nginx else '–'} "
                f"| {ms(r['p50_us'])} | {ms(r['p99_us'])} | {ms(r['p999_us'])} "
                f"| {calls:.2f} | {errors} | {cpu(row, r)} | {r['load_cpu'] * 100:.0f} % |"
            )
    fresh = [(row, by[(row, "fresh")]) for row in ROWS if (row, "fresh") in by]
    if any("proxy_user_us" in r for _, r in fresh):
        lines.append("")
        lines.append("**Where the proxy's CPU goes (fresh keys)**: per request, in the proxy "
                     "process itself (the upstream's, in its own row): its own code (user) and "
                     "the kernel's work for it (system: sockets, loopback TCP, file I/O).")
        lines.append("")
        lines.append("| row | user | system | total | user ÷ nginx's | system ÷ nginx's |")
        lines.append("|---|---|---|---|---|---|")
        base = by.get(("nginx", "fresh"), {})
        for row, r in fresh:
            if "proxy_user_us" not in r:
                continue
            u, k = r["proxy_user_us"], r["proxy_sys_us"]
            bu, bk = base.get("proxy_user_us", 0), base.get("proxy_sys_us", 0)
            lines.append(
                f"| {ROWS[row]} | {u:.1f} µs | {k:.1f} µs | {u + k:.1f} µs "
                f"| {ratio(u, bu)} | {ratio(k, bk)} |"
            )
    lines.append("")
    lines.append("**Against the targets**")
    lines.append("")
    lines.append(
        "Measured: the ratio of requests/s in this run. From CPU: the same ratio computed from "
        "the servers' CPU time per request (the requests/s one fully busy server core would "
        "give), which other jobs on the machine disturb far less."
    )
    lines.append("")
    lines.append("| target | measured | from CPU | |")
    lines.append("|---|---|---|---|")

    def verdict(ok, by_cpu=None):
        if by_cpu is None or by_cpu == ok:
            return "met" if ok else "**missed**"
        return "met in this run, **missed** by CPU" if ok else "**missed** in this run, met by CPU"

    def core_rate(r):
        total = r.get("proxy_cpu_us", 0) + r.get("upstream_cpu_us", 0) + r.get("store_cpu_us", 0)
        if r["row"] == "upstream":
            total = r.get("upstream_cpu_us", 0)
        return 1e6 / total if total else 0

    def cpu_ratio(a, b):
        return f"{core_rate(a) / core_rate(b):.2f}×" if core_rate(a) and core_rate(b) else "–"

    def cpu_ok(a, b, target):
        return core_rate(a) / core_rate(b) >= target if core_rate(a) and core_rate(b) else None

    sqlite, nginx = by.get(("sqlite", "fresh")), by.get(("nginx", "fresh"))
    if sqlite and nginx:
        r = sqlite["rps"] / nginx["rps"]
        lines.append(
            f"| fresh keys, embedded store: ≥ 0.8× nginx's requests/s | {r:.2f}× "
            f"| {cpu_ratio(sqlite, nginx)} | {verdict(r >= 0.8, cpu_ok(sqlite, nginx, 0.8))} |"
        )
        bound = nginx["p99_us"] + 1000
        lines.append(
            f"| fresh keys, embedded store: p99 ≤ nginx's p99 + 1 ms | {ms(sqlite['p99_us'])} "
            f"against {ms(bound)} | – | {verdict(sqlite['p99_us'] <= bound)} |"
        )
    upstream = by.get(("upstream", "replay"))
    if upstream:
        for row in ["sqlite", "memory", "postgres", "redis"]:
            r = by.get((row, "replay"))
            if r:
                x = r["rps"] / upstream["rps"]
                lines.append(
                    f"| replays, {ROWS[row].removeprefix('idem, ')}: ≥ 1.0× the upstream served "
                    f"directly | {x:.2f}× | {cpu_ratio(r, upstream)} "
                    f"| {verdict(x >= 1.0, cpu_ok(r, upstream, 1.0))} |"
                )
    redis, ipx = by.get(("redis", "fresh")), by.get(("ipx", "fresh"))
    if redis and ipx:
        x = redis["rps"] / ipx["rps"]
        lines.append(
            f"| fresh keys, Redis store: ≥ 3× idempotent-proxy-server's requests/s | {x:.2f}× "
            f"| {cpu_ratio(redis, ipx)} | {verdict(x >= 3.0, cpu_ok(redis, ipx, 3.0))} |"
        )
    return "\n".join(lines) + "\n"


def main():
    out = Path(sys.argv[1])
    text = report(out)
    if "--doc" not in sys.argv:
        sys.stdout.write(text)
        return
    doc = Path(sys.argv[sys.argv.index("--doc") + 1])
    current = doc.read_text()
    block = f"{BEGIN}\n\n{text}\n{END}"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        updated = head + block + tail
    else:
        updated = current.rstrip("\n") + "\n\n## Gateway: requests/s and latency\n\n" + block + "\n"
    doc.write_text(updated)


if __name__ == "__main__":
    main()
