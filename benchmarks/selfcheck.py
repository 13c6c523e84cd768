#!/usr/bin/env python3
"""
Checks the benchmark plumbing without starting anything: for every
measurement module, its canned result (EXAMPLE) goes through its table rows,
raw figures, chart panels and settings, to JSON and back; every module in
measurements/ must be registered; the command line must parse; a whole
report is written and, with matplotlib, the chart drawn (into a temporary
directory, or --out).

Then, from a saved run (--against, default results/latest.json), every
measurement's result is read back from the JSON and its rows must give the
same table as the Markdown file beside it (latest.md).

    .venv/bin/python benchmarks/selfcheck.py
    .venv/bin/python benchmarks/selfcheck.py --against results/2026-...json --out /tmp/check

Exit status 0 when everything holds, 1 otherwise (each problem is printed).
"""

import argparse
import base64
import datetime
import json
import os
import pkgutil
import shutil
import struct
import sys
import tempfile
import traceback
import zlib

import attr

import bench
import measurements
from harness import HERE, RESULTS
from harness import browser, chart, page_site
from harness.chart import Panel
from harness.measurement import Measurement, from_json, to_json
from harness.report import HEADER, Row, chart_panels, markdown, markdown_table, table_rows
from harness.services import load_generate

problems = []


def problem(text):
    problems.append(text)
    print("  PROBLEM: " + text)


def check_registry():
    print("registry:")
    registered = {id(m) for m in measurements.ALL}
    for info in pkgutil.iter_modules(measurements.__path__):
        module = __import__("measurements." + info.name, fromlist=["MEASUREMENT"])
        m = getattr(module, "MEASUREMENT", None)
        if not isinstance(m, Measurement):
            problem("measurements/%s.py has no MEASUREMENT = Measurement(...)" % info.name)
        elif id(m) not in registered:
            problem("measurements/%s.py is not in measurements.RUN_ORDER" % info.name)
    seen = set()
    for m in measurements.ALL:
        if m.name in seen:
            problem("two measurements are called %r" % m.name)
        seen.add(m.name)
    print("  %d measurements: %s" % (len(measurements.ALL), ", ".join(m.name for m in measurements.ALL)))


def check_command_line():
    print("command line:")
    for argv in ([], ["--quick"], ["--only", "http"], ["--only", "idle,churn", "--streams", "10"],
                 ["--only", "download", "--quick"], ["--only", "page_load", "--quick"]):
        try:
            args = bench.parse_args(argv)
        except SystemExit as e:
            problem("bench.py %s: exits with %s" % (" ".join(argv), e.code))
            continue
        print("  bench.py %-40s runs %s; rounds %d, out %s" % (
            " ".join(argv), ", ".join(m.name for m in args.selected), args.rounds, os.path.relpath(args.out)))
    if [m.name for m in bench.parse_args(["--only", "http"]).selected] != ["http", "connect"]:
        problem("--only http should run http and connect")


def check_measurement(m, args):
    result = m.example
    if not attr.has(type(result)) or not isinstance(result, m.result):
        problem("%s: EXAMPLE is not a %s" % (m.name, m.result.__name__))
        return
    rows = m.rows(result)
    for row in rows:
        if not isinstance(row, Row) or not all(isinstance(x, str) for x in attr.astuple(row)):
            problem("%s: a row is not a Row of text: %r" % (m.name, row))
        elif not row.measurement.startswith("%d " % m.number):
            problem("%s: row %r does not start with its number %d" % (m.name, row.measurement, m.number))
    if not rows:
        problem("%s: no rows" % m.name)
    raw = m.raw(result)
    if not all(isinstance(line, str) for line in raw):
        problem("%s: raw() gives something else than lines of text" % m.name)
    panels = m.panels(result)
    for panel in panels:
        if not isinstance(panel, Panel):
            problem("%s: a panel is not a Panel: %r" % (m.name, panel))
            continue
        for text in panel.problems():
            problem("%s: %s" % (m.name, text))
    if not isinstance(m.settings(args), str):
        problem("%s: settings() gives no text" % m.name)
    again = from_json(m.result, json.loads(json.dumps(to_json(result))))
    if again != result:
        problem("%s: the result changes through JSON:\n    %r\n    %r" % (m.name, result, again))
    print("  %-9s %d rows, %d raw lines, %d panels, JSON round trip ok" % (m.name, len(rows), len(raw),
                                                                          len(panels)))


def check_page_site():
    """page_load's site without nginx: valid images, the page's tags, the certificate's SPKI, the flags."""
    print("page_load's site and browser flags:")
    side = page_site.image_side(7)
    image = page_site.png(side, side, seed=7)
    width, height, depth, colour = struct.unpack(">IIBB", image[16:26])
    idat = image.index(b"IDAT")
    (length,) = struct.unpack(">I", image[idat - 4:idat])
    pixels = zlib.decompress(image[idat + 4:idat + 4 + length])
    if image[:8] != b"\x89PNG\r\n\x1a\n" or (width, height, depth, colour) != (side, side, 8, 2) \
            or len(pixels) != side * (1 + 3 * side) or not image.endswith(b"IEND\xaeB`\x82"):
        problem("page_site.png() does not make a %dx%d RGB PNG" % (side, side))
    origins = ["https://127.0.0.1:%d" % port for port in range(1001, 1001 + page_site.ORIGINS)]
    html = page_site.page_html(origins).decode()
    for origin in origins:
        if html.count('src="%s/img/' % origin) != page_site.IMAGES // page_site.ORIGINS:
            problem("the page does not take %d images from %s" % (page_site.IMAGES // page_site.ORIGINS, origin))
    certs = tempfile.mkdtemp(prefix="anyproxy-selfcheck-certs-")
    try:
        load_generate().generate(certs, ["127.0.0.1"])
        with open(os.path.join(certs, "server.crt"), "rb") as f:
            spki = page_site.spki_hash(f.read())
    finally:
        shutil.rmtree(certs)
    if len(base64.b64decode(spki)) != 32:
        problem("spki_hash() is not a base64 SHA-256: %r" % spki)
    args = browser.chromium_args([spki])
    for wanted in ("--ignore-certificate-errors-spki-list=" + spki, "--disable-background-networking",
                   "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        if wanted not in args:
            problem("Chromium's flags lack %s" % wanted)
    print("  %dx%d PNG of %d bytes, %d images over %d origins, SPKI %s..., %d Chromium flags" % (
        side, side, len(image), html.count("<img"), len(origins), spki[:8], len(args)))


def check_report(args, out):
    print("a whole report from the examples:")
    results = {m.name: m.example for m in measurements.ALL}
    text = markdown(measurements.ALL, results, args, 1024 * 1024, "2000-01-01 00:00", ["--selfcheck"],
                    [("host", "selfcheck")], "latest.png")
    path = os.path.join(out, "selfcheck.md")
    with open(path, "w") as f:
        f.write(text)
    print("  %s: %d lines" % (path, text.count("\n") + 1))
    if chart.available():
        png = os.path.join(out, "selfcheck.png")
        chart.render(chart_panels(measurements.ALL, results), png, "selfcheck: canned results")
        print("  %s: %d bytes" % (png, os.path.getsize(png)))
    else:
        print("  no chart: matplotlib is missing")


def read_results(path):
    """The typed results of a saved run, by measurement name."""
    with open(path) as f:
        data = json.load(f)
    http = data.get("http")
    if isinstance(http, dict) and "connect" in http and "connect" not in data:
        # Written before CONNECT had a module of its own: its runs sat under http.
        data["connect"] = {"runs": http.pop("connect")}
    return {m.name: from_json(m.result, data[m.name]) for m in measurements.ALL if m.name in data}


def check_against(path, out):
    print("against %s:" % os.path.relpath(path))
    try:
        results = read_results(path)
    except Exception:  # noqa: BLE001 - reported as a problem
        problem("cannot read %s:\n%s" % (path, traceback.format_exc()))
        return
    md_path = os.path.splitext(path)[0] + ".md"
    ours = markdown_table(table_rows(measurements.ALL, results)).splitlines()
    if os.path.exists(md_path):
        with open(md_path) as f:
            theirs = [line for line in f.read().splitlines() if line.startswith("|")]
        if theirs[:1] != ["| " + " | ".join(HEADER) + " |"]:
            problem("%s: no table found" % md_path)
        elif ours != theirs:
            problem("the table rebuilt from %s differs from %s:" % (os.path.basename(path), md_path))
            for a, b in zip(ours + [""] * len(theirs), theirs + [""] * len(ours)):
                if a != b:
                    print("    rebuilt: %s\n    saved:   %s" % (a, b))
        else:
            print("  the table rebuilt from the JSON (%s) is %s's, %d rows" % (
                ", ".join(results), os.path.basename(md_path), len(ours) - 2))
    else:
        print("  no %s beside it: not compared" % md_path)
    for m in measurements.ALL:
        if m.name in results:
            for panel in m.panels(results[m.name]):
                for text in panel.problems():
                    problem("%s: %s" % (m.name, text))
    if chart.available():
        png = os.path.join(out, "against.png")
        chart.render(chart_panels(measurements.ALL, results), png, "rebuilt from %s" % os.path.basename(path))
        print("  %s: %d bytes" % (png, os.path.getsize(png)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=os.path.join(RESULTS, "latest.json"),
                        help="a saved run's JSON to rebuild the table from (default results/latest.json; "
                             "'' for none)")
    parser.add_argument("--out", help="where to write the report and charts (default: a temporary directory, "
                                      "removed afterwards)")
    options = parser.parse_args()
    out = options.out or tempfile.mkdtemp(prefix="anyproxy-selfcheck-")
    os.makedirs(out, exist_ok=True)
    try:
        check_registry()
        check_command_line()
        args = bench.parse_args([])
        print("measurements:")
        for m in measurements.ALL:
            try:
                check_measurement(m, args)
            except Exception:  # noqa: BLE001 - reported as a problem
                problem("%s:\n%s" % (m.name, traceback.format_exc()))
        try:
            check_page_site()
        except Exception:  # noqa: BLE001 - reported as a problem
            problem("page_load's site:\n%s" % traceback.format_exc())
        check_report(args, out)
        if options.against:
            check_against(os.path.join(HERE, options.against) if not os.path.isabs(options.against)
                          else options.against, out)
    finally:
        if not options.out:
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
            os.rmdir(out)
    print("%s: %s" % (datetime.datetime.now().strftime("%H:%M:%S"),
                      "%d problems" % len(problems) if problems else "all good"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
