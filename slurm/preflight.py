"""Checks a SLURM submission can start, and lists the stages still to run (used by slurm/launch.sh).

    python slurm/preflight.py --job JOB.yaml --run-dir DIR [--set key.sub=value ...]

Prints the pending stages in order (e.g. `warmup joint`; nothing when all are complete) and exits 0,
or prints `error: ...` naming the problem and the fix and exits 2. It resolves the job exactly as
pipeline/train.py does, so a typo in a key fails here, before the queue wait, not on the nodes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import ConfigError, enabled_stages, load_config  # noqa: E402


def stage_complete(run_dir: Path, stage: str) -> bool:
    """The contract of pipeline/train.py: a stage is complete once its final manifest exists."""
    return (run_dir / stage / "final" / "manifest.json").is_file()


def check_run_dir(run_dir: Path, job_name: str) -> None:
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run directory {run_dir} ({err.strerror}): set RUN_DIR to a "
                          "writable directory on the shared file system") from None
    probe = run_dir / "logs" / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run directory {run_dir} is not writable ({err.strerror}): fix its permissions "
                          "or set RUN_DIR to another directory") from None
    saved = run_dir / "config.yaml"
    if saved.is_file():
        import yaml
        owner = (yaml.safe_load(saved.read_text()) or {}).get("job")
        if owner != job_name:
            raise ConfigError(f"run directory {run_dir} belongs to job '{owner}', not '{job_name}': "
                              "set RUN_DIR to another directory")


def check_data_root(root: str) -> None:
    path = Path(root) if Path(root).is_absolute() else REPO / root
    if not path.is_dir():
        raise ConfigError(f"data root {path} does not exist: set DATA_ROOT (or data.root in the job) to the "
                          "dataset folder, visible on every node (for data.generate: an existing, empty folder)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args, unknown = parser.parse_known_args(argv)
    try:
        if unknown:
            raise ConfigError(f"EXTRA_ARGS may only hold --set key.sub=value overrides; got {unknown} "
                              "(the template sets --job, --stage and --run-dir itself)")
        cfg = load_config(args.job, args.set)
        check_data_root(cfg["data"]["root"])
        check_run_dir(args.run_dir, cfg["job"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(" ".join(s for s in enabled_stages(cfg) if not stage_complete(args.run_dir, s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
