"""
The report: the table's rows and how figures are written, the Markdown file
(table, settings, machine, raw figures, chart) and latest.json.
"""

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess

import attr

from harness import KiB, ROOT
from harness.measurement import to_json

try:
    import psutil
except ImportError:  # selfcheck.py runs without it
    psutil = None


@attr.s(frozen=True, auto_attribs=True)
class Row:
    """One line of the table: one figure."""
    measurement: str   # "1 bulk upload, Mbit/s": the measurement's number first
    figure: str        # the path or what is counted
    result: str
    ratio: str = ""    # AnyProxy / peer
    target: str = ""
    met: str = ""      # "yes", "**no**", "n/a" or ""


HEADER = ("measurement", "path / figure", "result", "AnyProxy / peer", "target", "met")


# ---------------------------------------------------------------------------
# figures

def median(values):
    """The median of the values that are not None (runs that failed), or None."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return None if a is None or not b else a / b


def check(value, target, higher=True):
    """Whether C{value} meets C{target} (at least, or at most with C{higher} False), for the "met" column."""
    if value is None:
        return "n/a"
    return "yes" if (value >= target if higher else value <= target) else "**no**"


def yes_no(condition):
    return "yes" if condition else "**no**"


def num(value, pattern="{:,.0f}"):
    """A figure for the table (thousands separated), "n/a" for None."""
    return "n/a" if value is None else pattern.format(value)


def fmt(value, pattern="%.0f"):
    """A figure for log lines, raw figures and the chart, "n/a" for None."""
    return "n/a" if value is None else pattern % value


# ---------------------------------------------------------------------------
# the Markdown report and latest.json

def markdown_table(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        lines.append("| " + " | ".join(attr.astuple(row)) + " |")
    return "\n".join(lines)


def by_number(measurements):
    """The report's order: by number (the run order may differ)."""
    return sorted(measurements, key=lambda m: m.number)


def table_rows(measurements, results):
    return [row for m in by_number(measurements) if m.name in results for row in m.rows(results[m.name])]


def chart_panels(measurements, results):
    """The chart's panels, in the table's order."""
    return [panel for m in by_number(measurements) if m.name in results for panel in m.panels(results[m.name])]


def settings_line(measurements, args, window):
    parts = ["rounds %d" % args.rounds]
    parts += [text for text in (m.settings(args) for m in by_number(measurements)) if text]
    parts.append("AnyProxy log level %s, replicas 1, DEFAULT_WINDOW %d KiB" % (args.anyproxy_log_level,
                                                                            window // KiB))
    return "; ".join(parts)


def markdown(measurements, results, args, window, when, command, info, chart_name=None):
    """The whole report as Markdown text."""
    md = ["# AnyProxy benchmarks, %s%s" % (when, " (--quick smoke test)" if args.quick else ""),
          "",
          "Produced by `benchmarks/run%s` (see benchmarks/README.md). Medians of the rounds; "
          "ratios are AnyProxy / peer from this one run. All on loopback, one machine: "
          "compare only figures from the same run." % "".join(" " + a for a in command),
          "",
          markdown_table(table_rows(measurements, results)),
          "",
          "Settings: " + settings_line(measurements, args, window) + ".",
          "",
          "## Machine",
          ""]
    md += ["- %s: %s" % kv for kv in info]
    md += ["", "## Raw figures", ""]
    for m in by_number(measurements):
        lines = m.raw(results[m.name]) if m.name in results else []
        if lines:
            md += lines + [""]
    if chart_name:
        md += ["![chart](%s)" % chart_name, ""]
    return "\n".join(md)


def results_json(results):
    """latest.json: each measurement's result under its name, in the order they ran."""
    return {name: to_json(result) for name, result in results.items()}


def write_report(measurements, results, args, window, started, out_dir, command, chart_path=None):
    """
    Writes <date>-<host>.md, latest.md and latest.json in C{out_dir}; prints
    the table and the machine.
    """
    info = machine()
    text = markdown(measurements, results, args, window, started.strftime("%Y-%m-%d %H:%M"), command, info,
                    os.path.basename(chart_path) if chart_path else None)
    os.makedirs(out_dir, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname().split(".")[0]).strip("-") or "host"
    dated = os.path.join(out_dir, "%s-%s.md" % (started.strftime("%Y-%m-%d"), host))
    with open(dated, "w") as f:
        f.write(text)
    shutil.copyfile(dated, os.path.join(out_dir, "latest.md"))
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(results_json(results), f, indent=1, default=str)
    print()
    print(markdown_table(table_rows(measurements, results)))
    print()
    print("\n".join("%s: %s" % kv for kv in info))
    print()
    print("wrote %s, %s" % (os.path.relpath(dated), os.path.relpath(os.path.join(out_dir, "latest.md"))))


# ---------------------------------------------------------------------------
# the machine

def version(dist):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return "?"


def command_output(argv):
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip()
        return text.splitlines()[0] if text else "?"
    return "?"


def deb_version(package):
    out = command_output(["dpkg-query", "-W", "-f=${Version}", package])
    return out if out and "no packages" not in out else "?"


def machine():
    """(what, value) pairs: CPU, memory, OS, Python, the libraries, the checkout, the peers' versions."""
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else platform.processor() or "?"
    distro = "?"
    with contextlib.suppress(OSError):
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]+)', f.read(), re.M)
            distro = m.group(1) if m else "?"
    try:
        from OpenSSL import SSL
        openssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except Exception:  # noqa: BLE001 - informative only
        openssl = "?"
    commit = command_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "--no-optional-locks", "-C", ROOT, "status", "--porcelain",
                            "--untracked-files=no", "--", "anyproxy"])
    cores = psutil.cpu_count() if psutil else os.cpu_count()
    memory = "%.1f GiB" % (psutil.virtual_memory().total / 2 ** 30) if psutil else "?"
    return [
        ("host", socket.gethostname()),
        ("CPU", "%s, %d cores (%d usable)" % (cpu, cores, len(os.sched_getaffinity(0)))),
        ("memory", memory),
        ("OS / kernel", "%s / Linux %s" % (distro, platform.release())),
        ("Python", platform.python_version()),
        ("Twisted / Autobahn / pyOpenSSL", "%s / %s / %s" % (version("twisted"), version("autobahn"),
                                                             version("pyopenssl"))),
        ("OpenSSL (pyOpenSSL)", openssl),
        ("AnyProxy checkout", "%s%s" % (commit, " + local changes in anyproxy/" if dirty not in ("", "?") else "")),
        ("peers", "%s; pproxy %s; microsocks %s; %s; hey %s; proxychains4 %s" % (
            command_output(["ssh", "-V"]), version("pproxy"), deb_version("microsocks"),
            command_output(["iperf3", "--version"]).split(" (")[0], deb_version("hey"),
            deb_version("proxychains4"))),
        ("browser and web server", "chromium %s (Playwright %s); nginx %s" % (
            deb_version("chromium"), version("playwright"), deb_version("nginx"))),
    ]
