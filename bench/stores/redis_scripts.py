#!/usr/bin/env python3
"""The Redis server's time per store script, current scripts against a baseline revision's.

    bench/stores/redis_scripts.py [--baseline REV] [--records N] [--rounds R]

Starts a redis-server of its own (no persistence, loopback, a free port, a temporary
directory), loads `crates/idem-redis/scripts/*.lua` as the store sends them (with
`record.lua` after the first line, where it exists) from the working tree and from the git
revision REV (default HEAD~1), and for each set runs, on fresh ids each round:

- fresh claims: `claim.lua` on N new ids;
- completions: `complete.lua` on each of those records, with its token and a 300-byte
  response;
- replays: `claim.lua` again on each completed record.

Commands go pipelined over one connection, so the client's speed does not matter: what is
reported is the server's own time per script call (`usec_per_call` of `EVALSHA` in
`INFO commandstats`, which includes the commands the script runs), the median over R rounds
(default 5), the two sets alternating. Prints a Markdown table.
"""

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = "crates/idem-redis/scripts"
LEASE_MS, RETENTION_MS = 30_000, 86_400_000
RESPONSE = b"r" * 300
BATCH = 1000


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("redis closed the connection")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            value, self.buf = self.buf[:n], self.buf[n + 2 :]
            return value
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ValueError(f"unexpected reply {line!r}")

    def pipeline(self, commands):
        replies = []
        for start in range(0, len(commands), BATCH):
            chunk = commands[start : start + BATCH]
            self.sock.sendall(b"".join(encode(*c) for c in chunk))
            replies.extend(self._reply() for _ in chunk)
        for r in replies:
            if isinstance(r, RuntimeError):
                raise r
        return replies

    def call(self, *args):
        return self.pipeline([args])[0]


def script_source(name, rev):
    """A script as the store sends it, from the working tree (rev None) or a revision."""

    def read(path):
        if rev is None:
            full = os.path.join(ROOT, path)
            return open(full).read() if os.path.exists(full) else None
        shown = subprocess.run(
            ["git", "-C", ROOT, "show", f"{rev}:{path}"], capture_output=True, text=True
        )
        return shown.stdout if shown.returncode == 0 else None

    script = read(f"{SCRIPTS}/{name}.lua")
    if script is None:
        sys.exit(f"redis_scripts: no {name}.lua at {rev or 'the working tree'}")
    record = read(f"{SCRIPTS}/record.lua")
    if record is None:
        return script
    shebang, body = script.split("\n", 1)
    return f"{shebang}\n{record}\n{body}"


def evalsha_usec(conn):
    for line in conn.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return float(fields["usec_per_call"])
    return float("nan")


def token_of(reply):
    """The token of a claim's reply: an integer (a fresh key) or ['acquired', token, ...]."""
    if isinstance(reply, int):
        return reply
    if isinstance(reply, list) and reply and reply[0] == b"acquired":
        return int(reply[1])
    raise ValueError(f"not an acquired claim: {reply!r}")


def round_of(conn, shas, records):
    fingerprint = secrets.token_hex(32)
    run = secrets.token_hex(8)
    keys = [f"bench:{{{run}{i:08d}}}" for i in range(records)]
    times = {}

    conn.call("CONFIG", "RESETSTAT")
    claims = [
        ("EVALSHA", shas["claim"], 1, k, fingerprint, LEASE_MS, RETENTION_MS, secrets.token_hex(16))
        for k in keys
    ]
    tokens = [token_of(r) for r in conn.pipeline(claims)]
    times["fresh claim"] = evalsha_usec(conn)

    conn.call("CONFIG", "RESETSTAT")
    completes = [
        ("EVALSHA", shas["complete"], 1, k, t, RESPONSE, secrets.token_hex(16), "PUBLISH",
         "bench:settled", k)
        for k, t in zip(keys, tokens)
    ]
    for r in conn.pipeline(completes):
        if r != [b"ok"]:
            raise ValueError(f"complete answered {r!r}")
    times["completion"] = evalsha_usec(conn)

    conn.call("CONFIG", "RESETSTAT")
    for r in conn.pipeline(claims):
        if not (isinstance(r, list) and r and r[0] == b"completed"):
            raise ValueError(f"replay answered {r!r}")
    times["replay"] = evalsha_usec(conn)
    conn.call("FLUSHALL")
    return times


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD~1")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis_scripts: redis-server is missing (apt-get install redis-server)")
    work = tempfile.mkdtemp(prefix="idem-redis-scripts.")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL,
    )
    try:
        conn = None
        for _ in range(100):
            try:
                conn = Conn(port)
                conn.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        if conn is None:
            sys.exit("redis_scripts: the server did not start")
        version = conn.call("INFO", "server").decode()
        version = next(l for l in version.splitlines() if l.startswith("redis_version:"))
        sets = {}
        for label, rev in (("baseline", args.baseline), ("current", None)):
            sets[label] = {
                name: conn.call("SCRIPT", "LOAD", script_source(name, rev)).decode()
                for name in ("claim", "complete")
            }
        samples = {label: [] for label in sets}
        for _ in range(args.rounds):
            for label, shas in sets.items():
                samples[label].append(round_of(conn, shas, args.records))

        ops = ["fresh claim", "completion", "replay"]
        median = {
            label: {op: statistics.median(s[op] for s in rounds) for op in ops}
            for label, rounds in samples.items()
        }
        for label in median:
            median[label]["claim + completion"] = (
                median[label]["fresh claim"] + median[label]["completion"]
            )
        print(f"Server time per script call, {version.split(':')[1]}; median of "
              f"{args.rounds} rounds of {args.records} records; baseline {args.baseline}.\n")
        print("| operation | baseline µs | current µs | current ÷ baseline |")
        print("|---|---|---|---|")
        for op in ops[:2] + ["claim + completion", "replay"]:
            b, c = median["baseline"][op], median["current"][op]
            print(f"| {op} | {b:.2f} | {c:.2f} | {c / b:.2f}× |")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
