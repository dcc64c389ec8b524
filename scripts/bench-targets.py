#!/usr/bin/env python3
"""Reads one sitting's log (`scripts/bench-peers.sh --log FILE`) and prints
each of issue 16's targets beside what the sitting measured: the ratios
that otherwise have to be worked out by hand from three tables. Catch-up
and memory have no fixed target ("nothing gets worse"): compare them
with the last sitting's table in BENCHMARKS.md. It reports, never
asserts: the exit status is 0 whatever the figures, and 2 only when the
log lacks a line it needs (named in the message; a `BENCH_NODES=5`
sitting has other labels and no targets here).

usage: scripts/bench-targets.py LOG
"""

import re
import sys


class Missing(Exception):
    pass


def table_row(log, label):
    """The value cell of the first `| label | value |` row."""
    for line in log.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] == label:
            return cells[1]
    raise Missing(f"no table row {label!r}")


def number(text, pattern, what):
    found = re.search(pattern, text)
    if not found:
        raise Missing(f"no {what} in {text!r}")
    return float(found.group(1))


def failovers(log, topology):
    """Every kill's time in the runs of one topology."""
    times = []
    for line in log.splitlines():
        if line.startswith(topology) and " run " in line:
            listed = re.search(r"failovers \[([^\]]*)\]", line)
            if listed and listed.group(1).strip():
                times += [float(t) for t in listed.group(1).split(",")]
    if not times:
        raise Missing(f"no {topology!r} run lines with failovers")
    return times


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def wan_label(log):
    found = re.search(r"^\| (WAN [^:|]*): pipelined client \|", log, re.M)
    if not found:
        raise Missing("no WAN pipelined row (was BENCH_TOPOLOGY set?)")
    return found.group(1)


def rows(log):
    one = table_row(log, "loopback: 1 client")
    many = table_row(log, "loopback: 64 clients")
    nats_many = table_row(log, "64 clients, default sync (acks before fsync)")
    pipelined = number(table_row(log, "loopback: pipelined client"), r"(\d+) msg/s", "rate")
    wan = wan_label(log)
    wan_pipelined = number(table_row(log, f"{wan}: pipelined client"), r"(\d+) msg/s", "rate")
    many_rate = number(many, r"(\d+) msg/s", "rate")
    many_p99 = number(many, r"p99 ([0-9.]+) ms", "p99")
    one_p50 = number(one, r"p50 ([0-9.]+) ms", "p50")
    nats_rate = number(nats_many, r"(\d+) msg/s", "rate")
    loop_kills = failovers(log, "loopback")
    wan_kills = failovers(log, wan)
    elections = [
        number(table_row(log, f"{t}: leader changes during the load phases"), r"^(\d+)", "count")
        for t in ("loopback", wan)
    ]
    return [
        ("64 clients vs NATS JetStream", ">= 1.2x",
         f"{many_rate / nats_rate:.2f}x ({many_rate:,.0f} vs {nats_rate:,.0f} msg/s)",
         many_rate >= 1.2 * nats_rate),
        ("64 clients p99", "< 10 ms", f"{many_p99} ms", many_p99 < 10),
        ("1 client p50", "< 0.5 ms", f"{one_p50} ms", one_p50 < 0.5),
        ("WAN pipelined / loopback", ">= 85%",
         f"{100 * wan_pipelined / pipelined:.1f}% ({wan_pipelined:,.0f} / {pipelined:,.0f})",
         wan_pipelined >= 0.85 * pipelined),
        ("WAN kills: median, slowest", "< 0.8 s, < 1 s",
         f"{median(wan_kills):.2f} s, {max(wan_kills):.2f} s ({len(wan_kills)} kills)",
         median(wan_kills) < 0.8 and max(wan_kills) < 1.0),
        ("loopback pipelined", ">= 230,000/s", f"{pipelined:,.0f}/s", pipelined >= 230_000),
        ("loopback kills: slowest", "< 0.5 s",
         f"{max(loop_kills):.2f} s ({len(loop_kills)} kills)", max(loop_kills) < 0.5),
        ("elections under load", "0", f"{elections[0]:.0f} loopback, {elections[1]:.0f} WAN",
         elections == [0, 0]),
    ]


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(sys.argv) == 2 else 2
    with open(sys.argv[1], encoding="utf-8") as f:
        log = f.read()
    try:
        measured = rows(log)
    except Missing as e:
        print(f"{sys.argv[1]}: {e}", file=sys.stderr)
        return 2
    print("| issue 16 target | wanted | this sitting | |")
    print("| --- | --- | --- | --- |")
    for name, wanted, got, met in measured:
        print(f"| {name} | {wanted} | {got} | {'met' if met else 'missed'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
