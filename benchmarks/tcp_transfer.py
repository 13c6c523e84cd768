#!/usr/bin/env python3
"""
Bulk download through AnyProxy next to a direct download: now bench.py's
``download`` measurement (measurements/download.py), kept under its old
command line.

    .venv/bin/python benchmarks/tcp_transfer.py [--mb 100] [--rounds 3] [bench.py options ...]

is ``bench.py --only download --download-mb MB --rounds N``.
"""

import argparse
import os
import sys

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args, rest = parser.parse_known_args()
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
    os.execv(sys.executable, [sys.executable, bench, "--only", "download", "--download-mb", str(args.mb),
                              "--rounds", str(args.rounds)] + rest)
