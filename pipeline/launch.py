"""`accelerate launch`, ending with the training processes' exit code and one line that says it.

    python -m pipeline.launch [accelerate launch options] pipeline/train.py [training options]

takes exactly the arguments of `accelerate launch` and runs it in this process. accelerate 1.15
ends every launch whose worker exits non-zero with a traceback and exit code 1 (a
CalledProcessError from its one-process launcher, torchrun's ChildFailedError from the others),
which hides pipeline/train.py's codes: 2 bad input, 75 stopped for requeue. Here instead:

- the workers exited 75, or this launcher was signalled, forwarded the stop to them (torchrun)
  and the run left its requeue mark (pipeline.rundir): the last line is
      stopped for requeue: checkpoint at step N (STAGE) in RUN; rerun the same command to resume
  and the exit code 75;
- the workers failed with one code: a line naming it (their messages are above), and that code;
  with different codes, 1;
- signalled, with no requeue mark: 128 + the signal's number, as a shell reports it.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.rundir import REQUEUE_EXIT, clear_requeue_mark, requeue_line, requeue_mark

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def parse_args(argv=None):
    from accelerate.commands.launch import launch_command_parser
    parser = launch_command_parser()
    parser.prog = "python -m pipeline.launch"
    args = parser.parse_args(argv)
    args.quiet = False  # with -q accelerate exits 1 itself, and the workers' code is lost
    return args


def trained_run_dir(args) -> Path | None:
    """The run directory of a launch of pipeline/train.py; None for another script."""
    script = args.training_script
    ours = script == "pipeline.train" if args.module else Path(script).resolve() == TRAIN_SCRIPT
    if not ours:
        return None
    from pipeline.train import run_dir_of
    return run_dir_of(args.training_script_args)


def launch(args) -> tuple[list[int], signal.Signals | None]:
    """Run accelerate's launch: (exit codes of the workers that failed, the signal that stopped
    this launcher or None)."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # the one-process launcher
        return [err.returncode], None
    except ChildFailedError as err:  # torchrun: its agent has logged each failure above
        return [failure.exitcode for failure in err.failures.values()], None
    except SignalException as err:  # torchrun has forwarded the signal and waited for its workers
        return [], signal.Signals(err.sigval)
    return [], None


def outcome(codes: list[int], stop: signal.Signals | None, run_dir: Path | None) -> tuple[int, str | None]:
    """(exit code, last line to print) of a launch."""
    mark = requeue_mark(run_dir) if run_dir is not None else None
    if (codes and set(codes) == {REQUEUE_EXIT}) or (stop is not None and mark is not None):
        if mark is None:  # not pipeline/train.py, or a run directory we could not tell
            return REQUEUE_EXIT, "stopped for requeue (exit code 75); rerun the same command to resume"
        return REQUEUE_EXIT, requeue_line(run_dir, mark)
    if stop is not None:
        return 128 + stop.value, f"launch: stopped by {stop.name}"
    if not codes:
        return 0, None
    code = codes[0] if len(set(codes)) == 1 else 1
    code = 128 - code if code < 0 else code  # killed by a signal: torch reports minus its number
    listed = ", ".join(str(c) for c in codes)
    return code, f"launch: training process(es) exited with code(s) {listed}; see their messages above"


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = trained_run_dir(args)
    if run_dir is not None:
        with contextlib.suppress(OSError):  # pipeline/train.py reports an unusable run directory
            clear_requeue_mark(run_dir)
    code, line = outcome(*launch(args), run_dir)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
