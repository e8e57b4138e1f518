"""Tables, targets, docs/BENCHMARKS.md, plots and raw JSON for the benchmark's results.

Works on the plain dictionaries L{dfly.devtools.bench} produces (also as read
back from C{results.json}), so a report can be redrawn without re-measuring:

    python -m dfly.devtools.benchreport docs/bench/results.json [--out docs]
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

MiB = 1 << 20
SYSTEM_NAMES = {
    "dfly": "dfly",
    "dfly-saf": "dfly, store and forward (--no-relay)",
    "http": "plain HTTP (curl)",
    "bt": "BitTorrent (aria2c)",
}
TARGETS = {
    "last": 1.15,
    "p50": 1.05,
    "origin": 1.01,
    "cold": 0.4,
    "warm": 0.6,
    "rss_mb": 80.0,
    "sim": 1.2,
}


# -- small formatting helpers -------------------------------------------------------


def fmt_ratio(value: float | None, lower_bound: bool = False, digits: int = 2) -> str:
    """C{1.07}, or C{≥2.31} for a lower bound, or C{-} when there is nothing."""
    if value is None:
        return "-"
    return f"{'≥' if lower_bound else ''}{value:.{digits}f}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table: first and last columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    last = len(headers) - 1

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, last) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# -- the tables -----------------------------------------------------------------------

SWARM_HEADERS = [
    "N", "system", "T* (s)", "last/T*", "p50/T*", "p99/T*", "download/T*", "origin/S", "supernode/(N·S)", "peers/(N·S)", "ok", "note",
]


def ratio(run: dict[str, Any], key: str) -> tuple[float, bool]:
    fig = run[key]
    return fig["value"] / run["t_star"], bool(fig["lower_bound"])


def swarm_rows(swarm: list[dict[str, Any]] | None) -> list[list[str]]:
    rows = []
    for run in swarm or []:
        if "error" in run:
            rows.append([str(run["n"]), SYSTEM_NAMES.get(run["system"], run["system"]), f"{run['t_star']:.1f}",
                         "-", "-", "-", "-", "-", "-", "-", "no", f"failed: {run['error']}"])
            continue
        total = run["n"] * run["size"]
        served = run.get("extra", {}).get("served_bytes")
        inside = [t for t in run.get("extra", {}).get("dfget_seconds") or [] if t is not None]
        download = fmt_ratio(max(inside) / run["t_star"]) if inside and len(inside) == run["n"] else "-"
        rows.append([
            str(run["n"]),
            SYSTEM_NAMES.get(run["system"], run["system"]),
            f"{run['t_star']:.1f}",
            fmt_ratio(*ratio(run, "last")),
            fmt_ratio(*ratio(run, "p50")),
            fmt_ratio(*ratio(run, "p99")),
            download,
            fmt_ratio(run["origin_bytes"] / run["size"], run["system"] == "http" and run["last"]["lower_bound"]),
            fmt_ratio(served / total) if served is not None else "-",
            fmt_ratio(run["peer_bytes"] / total) if run["system"] != "http" else "0.00",
            "yes" if run["verified"] else "NO",
            run.get("note", ""),
        ])
    return rows


SINGLE_HEADERS = ["client", "seconds", "MiB/s", "vs curl", "from supernode (MiB)", "from peers (MiB)"]


def single_rows(single: dict[str, Any] | None) -> list[list[str]]:
    if not single or "error" in single:
        return []
    rows = [["curl -o", f"{single['curl_seconds']:.2f}", f"{single['curl_mib_s']:.0f}", "1.00", "-", "-"]]
    for label in ("cold", "warm"):
        rows.append([
            f"dfget {label}", f"{single[f'{label}_seconds']:.2f}", f"{single[f'{label}_mib_s']:.0f}",
            f"{single[f'{label}_vs_curl']:.2f}",
            _mib(single.get(f"{label}_from_supernode")), _mib(single.get(f"{label}_from_peers")),
        ])
    return rows


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


SIM_HEADERS = ["peers", "makespan/T*", "origin/S", "scheduler CPU s per simulated s", "wall (s)"]


def sim_value(entry: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        if isinstance(entry.get(key), int | float):
            return float(entry[key])
    return None


def sim_figures(entry: dict[str, Any]) -> dict[str, float | None]:
    makespan = sim_value(entry, "makespan_over_t_star", "makespan_ratio", "ratio")
    if makespan is None:
        m, t = sim_value(entry, "makespan", "makespan_seconds"), sim_value(entry, "t_star", "tstar")
        makespan = m / t if m is not None and t else None
    origin = sim_value(entry, "origin_egress_over_size", "origin_over_size")
    if origin is None:
        b, s = sim_value(entry, "origin_bytes", "origin_egress"), sim_value(entry, "size", "file_size")
        origin = b / s if b is not None and s else None
    cpu = sim_value(entry, "scheduler_cpu_per_sim_second", "cpu_per_sim_second")
    if cpu is None:
        c = sim_value(entry, "scheduler_cpu_seconds", "cpu_seconds")
        m = sim_value(entry, "makespan", "makespan_seconds")
        cpu = c / m if c is not None and m else None
    return {"makespan": makespan, "origin": origin, "cpu": cpu}


def sim_rows(sim: list[dict[str, Any]] | dict[str, Any] | None) -> list[list[str]]:
    if not isinstance(sim, list):
        return []
    rows = []
    for entry in sim:
        if "error" in entry:
            rows.append([str(entry.get("peers")), "-", "-", "-", f"failed: {entry['error']}"])
            continue
        f = sim_figures(entry)
        rows.append([str(entry["peers"]), fmt_ratio(f["makespan"], digits=3), fmt_ratio(f["origin"], digits=3),
                     fmt_ratio(f["cpu"], digits=4), f"{entry.get('wall_seconds', 0):.1f}"])
    return rows


# -- targets ----------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[list[str]]:
    """[target, measured, pass/miss/n.a.] rows."""
    out: list[list[str]] = []
    swarm = [r for r in results.get("swarm") or [] if "error" not in r]
    dfly = {r["n"]: r for r in swarm if r["system"] == "dfly"}
    others = {(r["system"], r["n"]): r for r in swarm if r["system"] != "dfly"}

    def verdict(ok: bool | None) -> str:
        return "n.a." if ok is None else ("pass" if ok else "miss")

    for n, run in sorted(dfly.items()):
        last, last_b = ratio(run, "last")
        p50, p50_b = ratio(run, "p50")
        origin = run["origin_bytes"] / run["size"]
        out.append([f"swarm N={n}: last dfly peer ≤ {TARGETS['last']}·T*", fmt_ratio(last, last_b), verdict(not last_b and last <= TARGETS["last"])])
        out.append([f"swarm N={n}: p50 ≤ {TARGETS['p50']}·T*", fmt_ratio(p50, p50_b), verdict(not p50_b and p50 <= TARGETS["p50"])])
        out.append([f"swarm N={n}: origin egress ≤ {TARGETS['origin']}·S", fmt_ratio(origin, digits=3), verdict(origin <= TARGETS["origin"])])
        if n >= 8:
            for system in ("http", "bt"):
                other = others.get((system, n))
                if other is None:
                    out.append([f"swarm N={n}: faster than {SYSTEM_NAMES[system]}", "not run", "n.a."])
                    continue
                o_last, o_b = ratio(other, "last")
                faster = (not last_b) and last < o_last
                out.append([f"swarm N={n}: faster than {SYSTEM_NAMES[system]}",
                            f"{fmt_ratio(last, last_b)} vs {fmt_ratio(o_last, o_b)}", verdict(faster)])
    single = results.get("single")
    if single and "error" not in single:
        size = f"{single['size'] / MiB:.0f} MiB"
        out.append([f"single: cold dfget ≥ {TARGETS['cold']}× curl", f"{single['cold_vs_curl']:.2f}", verdict(single["cold_vs_curl"] >= TARGETS["cold"])])
        out.append([f"single: warm dfget ≥ {TARGETS['warm']}× curl", f"{single['warm_vs_curl']:.2f}", verdict(single["warm_vs_curl"] >= TARGETS["warm"])])
        rss = single["peer_vmhwm_max_kib"] / 1024
        big = single["size"] >= 2 * 1024 * MiB
        out.append([f"single: peer RSS ≤ {TARGETS['rss_mb']:.0f} MB fetching 2 GiB (measured at {size})", f"{rss:.0f} MiB",
                    verdict(rss <= TARGETS["rss_mb"]) + ("" if big else " (smaller file)")])
    elif single:
        out.append(["single client", single.get("error", "not run"), "n.a."])
    sim = results.get("sim")
    if isinstance(sim, list):
        at = [e for e in sim if e.get("peers") == 10000 and "error" not in e]
        if at:
            m = sim_figures(at[0])["makespan"]
            out.append([f"simulator: makespan ≤ {TARGETS['sim']}·T* at 10 000 peers", fmt_ratio(m, digits=3), verdict(None if m is None else m <= TARGETS["sim"])])
        else:
            out.append([f"simulator: makespan ≤ {TARGETS['sim']}·T* at 10 000 peers", "not run", "n.a."])
    elif sim:
        out.append([f"simulator: makespan ≤ {TARGETS['sim']}·T* at 10 000 peers", "not available", "n.a."])
    return out


# -- text and markdown -----------------------------------------------------------------------


def text_report(results: dict[str, Any]) -> str:
    parts = []
    cfg = results["config"]
    if results.get("swarm") is not None:
        parts.append(f"Swarm: S = {cfg['size'] / MiB:.0f} MiB, B_peer = {cfg['rate'] / MiB:g} MiB/s, B_origin = {cfg['origin_rate'] / MiB:g} MiB/s; figures are ratios to T*")
        parts.append(text_table(SWARM_HEADERS, swarm_rows(results["swarm"])))
    single = results.get("single")
    if single is not None:
        parts.append("")
        if "error" in single:
            parts.append(f"Single client: {single['error']}")
        else:
            parts.append(f"Single client, no caps: {single['size'] / MiB:.0f} MiB; peak RSS peer {single['peer_vmhwm_max_kib'] / 1024:.0f} MiB, supernode {single['supernode_vmhwm_kib'] / 1024:.0f} MiB")
            parts.append(text_table(SINGLE_HEADERS, single_rows(single)))
    sim = results.get("sim")
    if sim is not None:
        parts.append("")
        if isinstance(sim, list):
            parts.append(f"Simulator: {cfg['sim_size'] / MiB:.0f} MiB file")
            parts.append(text_table(SIM_HEADERS, sim_rows(sim)))
        else:
            parts.append(f"Simulator: {sim.get('error', 'not available')}")
    parts.append("")
    parts.append("Targets")
    parts.append(text_table(["target", "measured", "result"], targets(results)))
    return "\n".join(parts)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    return info


def markdown_report(results: dict[str, Any], plots: list[str]) -> str:
    cfg = results["config"]
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Measured with one command, `scripts/bench` (all defaults), which starts every process",
        "itself on loopback and stops all of them at the end. Redraw this page from the raw figures",
        "with `python -m dfly.devtools.benchreport docs/bench/results.json`.",
        "",
        f"- date: {results['date']}",
        f"- command: `{cfg['command']}` ({results.get('wall_seconds', 0) / 60:.1f} min)",
        f"- machine: {m.get('cpu', '?')}, {m.get('nproc')} CPUs, {m.get('memory_gib', '?')} GiB memory, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}; load average at the start {' '.join(m.get('loadavg', []))}",
        "- the machine is shared with other work and noisy (see the load average, against its CPU count): single runs",
        "  can differ by tens of percent; use `--rounds 3` for medians when comparing changes.",
        "",
    ]
    for key, note in (results.get("notes") or {}).items():
        lines.append(f"- note ({key}): {note}")
    lines += [
        "",
        "## Swarm",
        "",
        f"N hosts, each capped at B = {cfg['rate'] / MiB:g} MiB/s up and down, fetch one file of S = {cfg['size'] / MiB:.0f} MiB",
        "of real data (system libraries, not zeros) from an origin capped at "
        f"B_origin = {cfg['origin_rate'] / MiB:g} MiB/s for all its clients together.",
        "The lower bound is T* = max(S/B_origin, S/B_peer, N·S/(B_origin + N·B_peer)); every figure is a ratio to T*,",
        "timed from the moment all N clients are started to each client's completion (process exit for dfget and curl,",
        "aria2c's download-complete hook for BitTorrent).",
        "",
        "- **dfly**: one supernode, N peer daemons with `--upload-rate B --download-rate B`, N `dfget --home` at once. The",
        "  supernode stands on the origin's side, so its uploads are capped at B_origin (`--upload-rate`), like the seeder's;",
        "  its share of the delivered bytes is the `supernode/(N·S)` column.",
        f"  Pieces of {cfg['piece_size'] / MiB:g} MiB (`--piece-size`; 4 MiB is dfly's own choice up to 200 MiB).",
        "  `download/T*` is the slowest download as the daemons timed it (from the request to the verified file), without",
        "  the start of the `dfget` process and the copy to its output: N Python clients starting at once on this machine's",
        "  few cores take seconds that N separate hosts would not.",
        "- **dfly, store and forward**: the same with the supernode's `--no-relay`: peers serve only pieces they hold",
        "  whole and verified (as BitTorrent peers do), side by side in the same run.",
        "- **plain HTTP**: N `curl --limit-rate B` at once from the same origin. It needs N·S/B_origin, so it is stopped at",
        f"  {cfg['http_deadline_factor']:g}·T*; its `last` is then a lower bound (≥): the deadline plus the bytes the origin still",
        "  had to send divided by B_origin; `p50`/`p99` of unfinished clients are ≥ the deadline.",
        "- **BitTorrent**: aria2c 1.36 leechers capped at B both ways, one aria2c seeder capped at B_origin (its uploads are the",
        "  `origin/S` column), our tracker on loopback (`dfly.devtools.tracker`), a .torrent from `dfly.devtools.torrent`",
        f"  with {cfg['piece_size'] / MiB:g} MiB pieces (dfly's piece size); DHT, LPD and peer exchange off. Leechers keep seeding",
        "  until the round ends, as dfly's daemons keep serving.",
        f"- {cfg['rounds']} round(s) per N and system; with more than one, the round with the median `last` is shown.",
        "- every completed copy is checked: dfly by md5 against the original, aria2c outputs by sha256, curl by size.",
        "",
        markdown_table(SWARM_HEADERS, swarm_rows(results.get("swarm"))) if results.get("swarm") is not None else "Not run.",
        "",
    ]
    lines += dfly_breakdown(results)
    single = results.get("single")
    lines += ["## Single client", ""]
    if single and "error" not in single:
        lines += [
            f"One {single['size'] / MiB:.0f} MiB file, no caps, one origin: `curl -o`, then a cold `dfget --home` through",
            "the first peer daemon (the supernode fetches from the origin while it serves), then a warm one through a second",
            "daemon (the first holds the file). Throughput is size / wall time of the client process.",
            f"Peak RSS (VmHWM): peer daemons {', '.join(f'{k} {v / 1024:.0f} MiB' for k, v in single['peer_vmhwm_kib'].items())};"
            f" supernode {single['supernode_vmhwm_kib'] / 1024:.0f} MiB.",
            f"Measured by `{single.get('source', 'dfly.devtools.bench')}`.",
        ]
        cpu = single.get("cpu_seconds") or {}
        for label in ("cold", "warm"):
            parts = [f"{k.split('_cpu_', 1)[1]} {v:.1f} s" for k, v in sorted(cpu.items()) if k.startswith(f"{label}_cpu_")]
            if parts:
                lines.append(f"CPU time of the {label} download: {', '.join(parts)}.")
        lines += [
            "",
            markdown_table(SINGLE_HEADERS, single_rows(single)),
            "",
        ]
    else:
        lines += [f"Not available: {single.get('error') if single else 'not run'}.", ""]
    sim = results.get("sim")
    lines += ["## Simulator", ""]
    if isinstance(sim, list):
        lines += [f"`python -m dfly.devtools.sim --peers N --size {cfg['sim_size']} --json` (the real scheduler, simulated hosts).", "",
                  markdown_table(SIM_HEADERS, sim_rows(sim)), ""]
    else:
        lines += [f"Not available: {(sim or {}).get('error', 'not run')}.", ""]
    lines += ["## Targets", "", "Targets are goals the benchmark reports on, not tests.", "",
              markdown_table(["target", "measured", "result"], targets(results)), ""]
    if plots:
        lines += ["## Plots", ""]
        for path in plots:
            lines.append(f"![{os.path.splitext(os.path.basename(path))[0]}](bench/{os.path.basename(path)})")
            lines.append("")
    return "\n".join(lines)


def dfly_breakdown(results: dict[str, Any]) -> list[str]:
    """Markdown lines splitting dfly's swarm time: client start and copy, daemon download, CPU."""
    runs = [r for r in results.get("swarm") or [] if r.get("system") == "dfly" and "error" not in r]
    rows = []
    for run in runs:
        inside = [t for t in run.get("extra", {}).get("dfget_seconds") or [] if t is not None]
        last = run["last"]["value"]
        download = max(inside) if inside else None
        cpu = run.get("cpu_seconds")
        piece = run.get("extra", {}).get("piece_count")
        rows.append([
            str(run["n"]), f"{last:.1f}", "-" if download is None else f"{download:.1f}",
            "-" if download is None else f"{last - download:.1f}",
            "-" if cpu is None else f"{cpu:.0f}", "-" if cpu is None else f"{cpu / last:.2f}",
            "-" if not piece else f"{run['size'] / piece / results['config']['rate']:.2f}",
        ])
    if not rows:
        return []
    return [
        "Where dfly's time goes: `download` is the slowest download as its daemon timed it; the rest of `last` is",
        "starting the `dfget` processes (N Python interpreters at once) and copying each verified file to its output.",
        "`CPU` is what the supernode and the N daemons used during the round (user + system), `cores` that divided by",
        "`last` (this machine has " + str(results.get("machine", {}).get("nproc", "?")) + " and shares them);",
        "`piece/B` is the time one piece takes over one capped link: with store and forward (`dfly-saf`) each hop of a",
        "piece (origin → supernode → peer → peer ...) waits for the whole piece before passing it on; relays pass it on",
        "as it arrives, so a hop costs a lag of one read or chunk instead.",
        "",
        markdown_table(["N", "last (s)", "download (s)", "client start + copy (s)", "CPU (s)", "cores", "piece/B (s)"], rows),
        "",
    ]


# -- plots ------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], directory: str) -> list[str]:
    """PNG plots (matplotlib, Agg); none when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    swarm = [r for r in results.get("swarm") or [] if "error" not in r]
    colors = {"dfly": "tab:blue", "dfly-saf": "tab:purple", "http": "tab:red", "bt": "tab:green"}
    if swarm:
        fig, ax = plt.subplots(figsize=(8, 5))
        for system in ("dfly", "dfly-saf", "bt", "http"):
            runs = sorted((r for r in swarm if r["system"] == system), key=lambda r: r["n"])
            if not runs:
                continue
            ns = [r["n"] for r in runs]
            last = [ratio(r, "last") for r in runs]
            ax.plot(ns, [v for v, _ in last], "-", color=colors[system], label=f"{SYSTEM_NAMES[system]}: last")
            for n, (v, bound) in zip(ns, last, strict=True):
                ax.plot([n], [v], "o", color=colors[system], mfc="white" if bound else colors[system], ms=7)
                if bound:
                    ax.annotate("≥", (n, v), textcoords="offset points", xytext=(6, -4), color=colors[system])
            p50 = [ratio(r, "p50") for r in runs]
            ax.plot(ns, [v for v, _ in p50], ":", color=colors[system], label=f"{SYSTEM_NAMES[system]}: p50")
            for n, (v, bound) in zip(ns, p50, strict=True):
                ax.plot([n], [v], "s", color=colors[system], mfc="white" if bound else colors[system], ms=5)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(TARGETS["last"], color="gray", ls="--", lw=0.8, label=f"target for dfly's last ({TARGETS['last']}·T*)")
        ax.set_xscale("log", base=2)
        ns_all = sorted({r["n"] for r in swarm})
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.set_yscale("log")
        _plain_log_ticks(ax, [r for run in swarm for r in (ratio(run, "last")[0], ratio(run, "p50")[0])] + [1.0])
        ax.set_xlabel("peers N")
        ax.set_ylabel("completion time / T*  (log scale)")
        ax.set_title("Swarm completion time vs N (hollow = lower bound at the deadline)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(directory, "swarm-time.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
        egress: list[float] = [1.0]
        for system in ("dfly", "dfly-saf", "bt", "http"):
            runs = sorted((r for r in swarm if r["system"] == system), key=lambda r: r["n"])
            if not runs:
                continue
            ns = [r["n"] for r in runs]
            if system == "http":
                # Every client fetches the whole file from the origin: N·S once all are done.
                ax1.plot(ns, ns, "--", color=colors[system], label=f"{SYSTEM_NAMES[system]}: N·S by construction")
                egress += [float(n) for n in ns]
                continue
            values = [r["origin_bytes"] / r["size"] for r in runs]
            egress += values
            ax1.plot(ns, values, "o-", color=colors[system], label=SYSTEM_NAMES[system])
        ax1.set_xscale("log", base=2)
        ns_all = sorted({r["n"] for r in swarm})
        ax1.set_xticks(ns_all, [str(n) for n in ns_all])
        ax1.set_yscale("log")
        _plain_log_ticks(ax1, egress)
        ax1.set_xlabel("peers N")
        ax1.set_ylabel("origin egress / S  (log scale)")
        ax1.set_title("Origin egress")
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=8)
        labels, origin, cdn, peers = [], [], [], []
        for n in ns_all:
            for system in ("dfly", "bt"):
                run = next((r for r in swarm if r["system"] == system and r["n"] == n), None)
                if run is None:
                    continue
                total = run["n"] * run["size"]
                labels.append(f"{system}\nN={n}")
                c = run["cdn_bytes"] / total
                p = run["peer_bytes"] / total
                direct = run["origin_bytes"] / total if system == "bt" else 0.0
                origin.append(direct)
                cdn.append(c)
                peers.append(p)
        xs = range(len(labels))
        ax2.bar(xs, origin, color="tab:red", label="origin / seeder")
        ax2.bar(xs, cdn, bottom=origin, color="tab:orange", label="supernode")
        ax2.bar(xs, peers, bottom=[a + b for a, b in zip(origin, cdn, strict=True)], color="tab:blue", label="other peers")
        ax2.set_xticks(list(xs), labels, fontsize=7)
        ax2.set_ylabel("bytes sent to peers / (N·S)")
        ax2.set_title("Where peers' bytes came from (above 1: duplicates)")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(directory, "swarm-bytes.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    single = results.get("single")
    if single and "error" not in single:
        fig, ax = plt.subplots(figsize=(6, 4))
        names = ["curl -o", "dfget cold", "dfget warm"]
        values = [single["curl_mib_s"], single["cold_mib_s"], single["warm_mib_s"]]
        bars = ax.bar(names, values, color=["tab:red", "tab:blue", "tab:cyan"])
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:.0f} MiB/s\n{v / values[0]:.2f}× curl", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("MiB/s")
        ax.set_ylim(0, max(values) * 1.25)
        ax.set_title(f"Single client, no caps, {single['size'] / MiB:.0f} MiB")
        fig.tight_layout()
        path = os.path.join(directory, "single.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plain_log_ticks(ax: Any, values: list[float]) -> None:
    """Label a log axis with plain numbers (1, 1.5, 2, 3 ...) covering C{values}."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    top = max(values) if values else 1.0
    bottom = min(values) if values else 1.0
    candidates = [0.5, 0.75, 1, 1.15, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]
    ticks = [t for t in candidates if bottom * 0.9 <= t <= top * 1.1] or [1]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def write_all(results: dict[str, Any], out: str) -> list[str]:
    """OUT/bench/results.json, OUT/bench/*.png and OUT/BENCHMARKS.md; returns the paths."""
    directory = os.path.join(out, "bench")
    os.makedirs(directory, exist_ok=True)
    raw = os.path.join(directory, "results.json")
    with open(raw + ".tmp", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(raw + ".tmp", raw)
    plots = write_plots(results, directory)
    doc = os.path.join(out, "BENCHMARKS.md")
    with open(doc, "w") as f:
        f.write(markdown_report(results, plots))
    return [doc, raw, *plots]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dfly.devtools.benchreport", description=__doc__)
    p.add_argument("results", help="results.json written by scripts/bench")
    p.add_argument("--out", default="docs", help="where BENCHMARKS.md and bench/ go (default ./docs)")
    a = p.parse_args(argv)
    with open(a.results) as f:
        results = json.load(f)
    print(text_report(results))
    for path in write_all(results, a.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
