"""Preflight check of a job's dataset: every bad file, listed by path, before a run starts.

    python -m pipeline.check_data --job jobs/imagenet_r50.yaml --set data.root=/data/imagenet

Exits 0 with a one-line summary when the dataset is usable, 1 after listing every problem, 2 when
the job or its data section cannot be used. What counts as bad, and what is only noted (usable,
but worth knowing; --strict fails on notes too): pipeline.data.check.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config import load_config
from pipeline.data.check import check_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.check_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True, help="job file (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. data.root=/data/imagenet (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: all CPUs)")
    parser.add_argument("--strict", action="store_true", help="fail on notes too")
    args = parser.parse_args(argv)

    try:
        data_cfg = load_config(args.job, args.set)["data"]
        report = check_dataset(data_cfg, workers=args.workers)
    except ValueError as err:  # ConfigError, or DataError from a bad data section
        print(f"error: {err}")
        return 2
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"bad: {problem}")
    failed = report.problems or (args.strict and report.notes)
    where = f"{data_cfg['dataset']} at {data_cfg['root']}"
    if failed:
        print(f"FAILED: {len(report.problems)} problem(s), {len(report.notes)} note(s) in {where}")
        return 1
    print(f"OK: {report.samples} images in {where}, no problems ({len(report.notes)} note(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
