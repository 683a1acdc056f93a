#!/usr/bin/env python3
"""Turns bench/run.sh's raw measurements into the results table.

Input: one JSON line per measurement (scenario, peer, round, loadgen's JSON
result, the peer's CPU seconds over the measured window, idle RSS/fd
samples) and the environment. Output: PREFIX.json (environment, medians,
every raw measurement), PREFIX.md (the tables) and PREFIX/ (SVG charts).

Every figure is the median over rounds of one peer; ratios divide the
medians of two peers measured in the same run. With --check (smoke), exits
non-zero when a peer completed no work in some measurement or the direct
path saw an error. Standard library only.
"""

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

# scenario -> (title, metric, unit, work unit per CPU-second, higher is better)
SCENARIOS = {
    "stream-1": ("tcp-stream, 1 connection", "gbit", "Gbit/s", "Gbit", True),
    "stream-8": ("tcp-stream, 8 connections", "gbit", "Gbit/s", "Gbit", True),
    "crr-64": ("tcp-crr, 64 concurrent (connect, 64 B echo, close)", "ops", "conn/s", "conn", True),
    "rr-64": ("tcp-rr keep-alive, 64 connections, closed loop", "ops", "req/s", "req", True),
    "rr-1": ("tcp-rr, 1 connection, fixed rate (latency)", "p50", "µs p50", "req", False),
    "udp-rr": ("udp-rr, 16 flows, closed loop", "ops", "req/s", "req", True),
    "idle": ("idle connections held (memory per connection)", "rss_per_conn", "KB/conn", None, False),
    "udp-iperf": ("iperf3 -u -b 2G -l 32K (receiver's loss)", "loss", "% lost", None, False),
}
PEER_ORDER = ["direct", "ringport", "ringport-copy", "ringport-ring", "ringport-splice", "ringport-w1", "haproxy", "nginx"]


def load_raw(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows


def work_done(row):
    """Units of work in the measured window: Gbit, connections or requests."""
    lg = row["loadgen"]
    if row["scenario"].startswith("stream"):
        return (lg["bytes_sent"] + lg["bytes_received"]) * 8 / 1e9
    return lg["completed"]


def metrics(row):
    """Per-measurement figures, or None when loadgen produced no result."""
    if "iperf" in row:
        ip = row["iperf"]
        if ip is None:
            return None
        return {"loss": ip["lost_percent"], "gbit": ip["gbit"], "errors": 0, "completed": ip["packets"],
                "rcvbuf_errors": ip["rcvbuf_errors"]}
    lg = row["loadgen"]
    if lg is None:
        return None
    lat = lg.get("latency_us") or {}
    m = {
        "gbit": lg["gbit_per_s"],
        "ops": lg["ops_per_s"],
        "p50": lat.get("p50"),
        "p99": lat.get("p99"),
        "errors": lg["errors_total"],
        "completed": lg["completed"],
    }
    if row["cpu_s"] > 0:
        m["per_cpu_s"] = work_done(row) / row["cpu_s"]
    if row["scenario"] == "idle":
        est = lg.get("established") or 0
        idle = row["idle"]
        m["completed"] = est
        if est and idle["rss_kb_settled"]:
            # VmRSS is in KiB; report KB (1000 B) like the table.
            m["rss_per_conn"] = (idle["rss_kb_settled"] - idle["rss_kb_before"]) * 1.024 / est
            m["fds_per_conn"] = (idle["fds_settled"] - idle["fds_before"]) / est
            m["rss_per_conn_at_ready"] = (idle["rss_kb_ready"] - idle["rss_kb_before"]) * 1.024 / est
    return m


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows):
    """{scenario: {peer: {metric: median, 'errors': sum, 'rounds': n}}}."""
    out = {}
    for row in rows:
        out.setdefault(row["scenario"], {}).setdefault(row["peer"], []).append(metrics(row))
    summary = {}
    for scen, peers in out.items():
        summary[scen] = {}
        for peer, ms in peers.items():
            good = [m for m in ms if m is not None]
            keys = {k for m in good for k in m}
            s = {k: median([m.get(k) for m in good]) for k in keys}
            for k in keys:
                vals = [m[k] for m in good if m.get(k) is not None]
                if vals:
                    s[k + "_min"], s[k + "_max"] = min(vals), max(vals)
            s["errors"] = sum(m["errors"] for m in good)
            s["rounds"] = len(ms)
            s["failed_rounds"] = len(ms) - len(good)
            summary[scen][peer] = s
    return summary


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, digits=3):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def fmt_ratio(v):
    return "n/a" if v is None else f"{v:.2f}"


def detail_table(summary):
    lines = [
        "| scenario | peer | median | rounds min–max | vs direct | vs HAProxy | p99 µs | work per CPU-second | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scen, (title, metric, unit, work, _) in SCENARIOS.items():
        peers = summary.get(scen, {})
        if not peers:
            continue
        direct = peers.get("direct", {}).get(metric)
        haproxy = peers.get("haproxy", {}).get(metric)
        for peer in PEER_ORDER:
            s = peers.get(peer)
            if s is None:
                continue
            v = s.get(metric)
            cell = f"{fmt(v)} {unit}"
            if scen == "idle":
                cell += f", {fmt(s.get('fds_per_conn'))} fd/conn"
            if scen == "udp-iperf":
                cell += f", {fmt(s.get('rcvbuf_errors'))} UdpRcvbufErrors"
            eff = s.get("per_cpu_s")
            eff_cell = f"{fmt(eff)} {work}/CPU-s" if work and eff else "n/a"
            fail = f" ({s['failed_rounds']} rounds without result)" if s["failed_rounds"] else ""
            spread = f"{fmt(s.get(metric + '_min'))}–{fmt(s.get(metric + '_max'))}"
            lines.append(
                f"| {title} | {peer} | {cell} | {spread} | {fmt_ratio(ratio(v, direct))} | {fmt_ratio(ratio(v, haproxy))}"
                f" | {fmt(s.get('p99'))} | {eff_cell} | {s['errors']}{fail} |"
            )
        if scen in ("udp-rr", "udp-iperf"):
            lines.append(f"| {title} | haproxy | n/a (HAProxy has no UDP proxying) | | | | | | |")
    return lines


def standing_table(summary):
    """The issue's "where we stand" shape: each proxy against direct."""
    g = lambda scen, peer, k: summary.get(scen, {}).get(peer, {}).get(k)  # noqa: E731
    rows = [
        ("bulk, 1 stream (× direct)", "stream-1", "gbit"),
        ("bulk, 8 streams (× direct)", "stream-8", "gbit"),
        ("short connections (× direct)", "crr-64", "ops"),
        ("keep-alive, 64 connections (× direct)", "rr-64", "ops"),
    ]
    lines = ["| measurement | ringport | HAProxy | nginx | direct |", "|---|---|---|---|---|"]
    for name, scen, k in rows:
        d = g(scen, "direct", k)
        cells = [fmt_ratio(ratio(g(scen, p, k), d)) for p in ("ringport", "haproxy", "nginx")]
        lines.append(f"| {name} | {' | '.join(cells)} | 1.00 |")
    lines.append(
        "| 1-connection p50 / p99 (µs) | "
        + " | ".join(f"{fmt(g('rr-1', p, 'p50'))} / {fmt(g('rr-1', p, 'p99'))}" for p in ("ringport", "haproxy", "nginx", "direct"))
        + " |"
    )
    lines.append(
        "| UDP loss at 2 Gbit/s, iperf3 (× direct's loss) | "
        + fmt_ratio(ratio(g("udp-iperf", "ringport", "loss"), g("udp-iperf", "direct", "loss")))
        + f" | | | 1.00 ({fmt(g('udp-iperf', 'direct', 'loss'))}% lost) |"
    )
    lines.append(
        "| idle memory per connection | "
        + " | ".join(f"{fmt(g('idle', p, 'rss_per_conn'))} KB" for p in ("ringport", "haproxy", "nginx"))
        + " | |"
    )
    s1c = g("stream-1", "ringport-copy", "gbit")
    lines.append(
        f"| bulk, 1 stream, ringport --relay copy | {fmt_ratio(ratio(s1c, g('stream-1', 'direct', 'gbit')))} | | | 1.00 |"
    )
    return lines


def scaling_lines(summary):
    out = []
    for scen in ("crr-64", "rr-64"):
        peers = summary.get(scen, {})
        w1, w2 = peers.get("ringport-w1", {}).get("ops"), peers.get("ringport", {}).get("ops")
        if w1 and w2:
            out.append(f"- {SCENARIOS[scen][0]}: `--workers 2` / `--workers 1` = {w2 / w1:.2f}")
    return out


def bar_chart(summary, path):
    """One SVG: each proxy's median as a fraction of direct, per scenario."""
    scens = [s for s in ("stream-1", "stream-8", "crr-64", "rr-64", "udp-rr") if s in summary]
    peers = [("ringport", "#d95f02"), ("haproxy", "#1b9e77"), ("nginx", "#7570b3")]
    w, h, left, top, bottom = 720, 320, 50, 30, 60
    group = (w - left - 20) / max(len(scens), 1)
    bw = group / (len(peers) + 1)
    ymax = 1.2
    y = lambda v: top + (h - top - bottom) * (1 - min(v, ymax) / ymax)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="16" font-size="13">median throughput as a fraction of direct (higher is better)</text>',
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{w - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.2f}</text>')
    for i, scen in enumerate(scens):
        d = summary[scen].get("direct", {}).get(SCENARIOS[scen][1])
        for j, (peer, color) in enumerate(peers):
            v = ratio(summary[scen].get(peer, {}).get(SCENARIOS[scen][1]), d)
            x = left + i * group + (j + 0.5) * bw
            if v is None:
                parts.append(f'<text x="{x + bw / 2:.1f}" y="{y(0) - 4:.1f}" text-anchor="middle" font-size="9">n/a</text>')
                continue
            parts.append(
                f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw * 0.9:.1f}" height="{y(0) - y(v):.1f}" fill="{color}"/>'
            )
            parts.append(f'<text x="{x + bw * 0.45:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" font-size="9">{v:.2f}</text>')
        parts.append(f'<text x="{left + (i + 0.5) * group:.1f}" y="{h - bottom + 16}" text-anchor="middle">{scen}</text>')
    for j, (peer, color) in enumerate(peers):
        parts.append(f'<rect x="{left + j * 110}" y="{h - 22}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + j * 110 + 14}" y="{h - 13}">{peer}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def check(rows, summary):
    """Smoke verdict: problems that make the run fail, and warnings."""
    problems, warnings = [], []
    for row in rows:
        where = f"{row['scenario']}/{row['peer']} round {row['round']}"
        m = metrics(row)
        if m is None:
            problems.append(f"{where}: loadgen produced no result (exit {row['loadgen_rc']})")
            continue
        if not m["completed"]:
            problems.append(f"{where}: zero completed work")
        if row["peer"] == "direct" and m["errors"]:
            problems.append(f"{where}: {m['errors']} errors on the direct path: {row['loadgen']['errors']}")
        elif m["errors"]:
            warnings.append(f"{where}: {m['errors']} errors: {row['loadgen']['errors']}")
    for scen in SCENARIOS:
        if scen not in summary:
            problems.append(f"{scen}: never measured")
    return problems, warnings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--env", required=True)
    ap.add_argument("--svg-dir", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--pin", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--elapsed", type=int, required=True)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()

    rows = load_raw(a.raw)
    env = json.loads(Path(a.env).read_text())
    summary = summarize(rows)
    prefix = Path(a.prefix)
    svg_dir = Path(str(prefix))
    svg_dir.mkdir(parents=True, exist_ok=True)
    bar_chart(summary, svg_dir / "ratios.svg")
    for svg in sorted(Path(a.svg_dir).glob("*.svg")):
        shutil.copy(svg, svg_dir / svg.name)

    pin = "proxy on core 0, load and backends on core 1" if a.pin == "1" else "nothing pinned"
    md = [
        f"# ringport peer benchmark: {prefix.name}",
        "",
        f"Mode `{a.mode}`, {a.rounds} interleaved round(s), {pin}; {a.elapsed} s of load. "
        f"ringport `{env['ringport_commit'][:10]}`{' (uncommitted source changes)' if env['source_dirty'] else ''}.",
        "Every figure is the median over rounds; ratios divide two medians of the same run.",
        "The machine is shared: see the rounds' min–max and the load averages below before",
        "reading much into a difference of a few percent.",
        "",
        "## Where we stand",
        "",
        *standing_table(summary),
        "",
        "## Every measurement",
        "",
        "vs direct / vs HAProxy: throughput ratios (higher is better); for latency and memory,",
        "the ratio of the values (lower is better). Work per CPU-second: the proxy's own",
        "utime+stime over the measured window, all threads and processes.",
        "",
        *detail_table(summary),
        "",
    ]
    scaling = scaling_lines(summary)
    if scaling:
        md += ["## ringport scaling, workers 1 -> 2", "", *scaling, ""]
    md += [
        "## Charts",
        "",
        f"- [`ratios.svg`]({svg_dir.name}/ratios.svg): throughput as a fraction of direct",
        *[f"- [`{p.name}`]({svg_dir.name}/{p.name}): latency percentiles, tcp-rr 1 connection, last round"
          for p in sorted(svg_dir.glob("rr-1-*.svg"))],
        "",
        "## Environment",
        "",
        *[f"- {k}: `{v if isinstance(v, str) else json.dumps(v)}`" for k, v in env.items()],
        "",
    ]
    problems, warnings = check(rows, summary)
    if warnings or problems:
        md += ["## Errors seen", "", *[f"- {w}" for w in problems + warnings], ""]
    prefix.with_suffix(".md").write_text("\n".join(md))
    result = {"mode": a.mode, "pin": a.pin == "1", "rounds": a.rounds, "elapsed_s": a.elapsed,
              "environment": env, "medians": summary, "measurements": rows}
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(standing_table(summary) + [""] + detail_table(summary)))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if a.check and problems:
        for p in problems:
            print(f"SMOKE FAILURE: {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
