"""Train RDI-Net: the USW warm-up stage and the joint stage, each resumable, handing on a checkpoint.

    accelerate launch pipeline/train.py [--job jobs/cifar10_r110.yaml] [--stage warmup|joint]
                                        [--run-dir runs/NAME] [--set key.sub=value ...]

Without --job it runs jobs/demo.yaml (generated data, both stages, minutes on a CPU). Without
--stage it runs every stage not yet complete, in order. Re-running an interrupted stage resumes it
from its latest checkpoint; re-running a completed one says so and exits 0.

Exit codes: 0 done; 2 bad job, config, data or run directory; 75 stopped by SIGTERM/SIGUSR1 (or
train.stop_at_step) after writing a checkpoint: requeue and run again to resume; 1 anything else.
These are each process's codes: `accelerate launch` itself exits 1 when a worker exits non-zero;
`python -m pipeline.launch`, which takes the same arguments, exits with the workers' code
(docs/reliability.md).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import io
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Noted before the pipeline is imported, which sets TORCHINDUCTOR_CACHE_DIR to torch's default.
COMPILE_CACHE_CHOSEN = "TORCHINDUCTOR_CACHE_DIR" in os.environ

from pipeline import checkpoint as ckpt  # noqa: E402
from pipeline.config import ConfigError, STAGES, enabled_stages, load_config  # noqa: E402
from pipeline.rundir import (check_run_dir, clear_requeue_mark, is_main_rank, mark_stopped_for_requeue,  # noqa: E402
                             record_config)

USAGE_EXIT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=None, help="job YAML (default: jobs/demo.yaml)")
    parser.add_argument("--stage", choices=STAGES, default=None, help="run one stage (default: all pending)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<job>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=0.2 --set data.root=/data")
    return parser.parse_args(argv)


def bound_collective_waits(seconds: float) -> None:
    """Make every process group wait at most `seconds` for a collective, so the others fail instead of
    hanging when a rank dies or stalls. train.dist_timeout reaches the world group through accelerate,
    but DeepSpeed all-reduces the gradients over its own copy of it (deepspeed.utils.groups), made by
    `new_group` with torch's default timeout (30 min for gloo, 10 for NCCL)."""
    from torch.distributed import distributed_c10d
    timeout = datetime.timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout


def die_with_the_launcher() -> None:
    """torchrun starts each worker in a session of its own: a launcher killed alone (kill -9, the OOM
    killer) would leave its workers training on, unseen, beside a rerun in the same run directory.
    On Linux the kernel is asked to SIGKILL this worker when its launcher dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before this process asked
        os.kill(os.getpid(), signal.SIGKILL)


def claim_run_dir(run_dir: Path, cfg: dict) -> None:
    """Called by each stage once its data is checked: only from then on does the run directory get
    the run's config and compile cache, so a start that fails (no data) leaves neither behind."""
    if cfg["train"]["compile"] != "none" and not COMPILE_CACHE_CHOSEN:
        # torch.compile's caches in the run directory: a stage resumed after preemption or a time
        # limit, on any node that sees the run directory, loads its compiled graphs instead of
        # compiling them again (minutes for RDI-Net-110). torch's default is node-local. Inductor
        # reads the variable whenever it compiles, so setting it now, before the first compile, holds.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(run_dir).resolve() / "compile_cache")
    if is_main_rank():
        record_config(run_dir, cfg)


def chosen_run_dir(args, cfg: dict) -> Path:
    return args.run_dir or Path("runs") / cfg["job"]


def run_dir_of(argv) -> Path | None:
    """The run directory that this command line (the training script's arguments) trains in, or
    None when it does not parse or its job does not load: the training processes then say why."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            args = parse_args(argv)
            return chosen_run_dir(args, load_config(args.job, args.set))
        except (SystemExit, ConfigError, ValueError, OSError):
            return None


def main(argv=None) -> int:
    die_with_the_launcher()
    args = parse_args(argv)
    try:
        cfg = load_config(args.job, args.set)
        run_dir = chosen_run_dir(args, cfg)
        stages = enabled_stages(cfg)
        if args.stage is not None and args.stage not in stages:
            raise ConfigError(f"stage '{args.stage}' is disabled in this job (stages.{args.stage}.epochs is 0)")
        todo = [args.stage] if args.stage else stages
        changed = check_run_dir(run_dir, cfg)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT
    if changed and is_main_rank():
        print("note: resuming with " + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
              + f"; {run_dir / 'config.yaml'} takes the new values once a stage starts", flush=True)
    if is_main_rank():
        clear_requeue_mark(run_dir)

    from pipeline.data import DataError
    from pipeline.trainer import REQUEUE_EXIT, process_stopper, run_stage
    bound_collective_waits(cfg["train"]["dist_timeout"])
    for stage in todo:
        if ckpt.read_manifest(run_dir / stage) is not None:
            print(f"{stage}: already complete ({run_dir / stage / 'final'}); nothing to do")
            continue
        if process_stopper().flag:  # stopped after the previous stage's last step: start no new one
            print(f"{stage}: stop requested before this stage started; exiting for requeue", flush=True)
            if is_main_rank():
                mark_stopped_for_requeue(run_dir, stage, None)
            return REQUEUE_EXIT
        if stage == "joint" and "warmup" in stages and ckpt.read_manifest(run_dir / "warmup") is None:
            job = f" --job {args.job}" if args.job else ""
            print(f"error: the joint stage starts from the completed warm-up, and {run_dir / 'warmup' / 'final'} "
                  f"does not exist. Run it first: accelerate launch pipeline/train.py{job} --run-dir {run_dir} "
                  f"--stage warmup", file=sys.stderr)
            return USAGE_EXIT
        try:
            code = run_stage(cfg, stage, run_dir, on_start=functools.partial(claim_run_dir, run_dir, cfg))
        except (ConfigError, DataError, FileNotFoundError, ckpt.CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return USAGE_EXIT
        except FloatingPointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if code != 0:
            return code
    return 0


def ignore_stop_signals() -> None:
    """Once main() has returned, the outcome is on disk and in the exit code. torchrun sends SIGTERM
    to the workers still running when the first one exits, and Python restores the default
    (fatal) handlers while it shuts down: ignore the stop signals so that the exit code stands."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    code = main()
    ignore_stop_signals()
    sys.exit(code)
