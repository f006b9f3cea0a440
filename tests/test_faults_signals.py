"""Stop signals and lost ranks, on real runs.

- SIGTERM / SIGUSR1 to a training process: a checkpoint at the next steps, then exit code 75.
- Through `accelerate launch` (torchrun's agent): the agent forwards SIGTERM, the workers exit 75,
  the launcher itself exits 1 and lists the workers' `exitcode : 75`. Through
  `python -m pipeline.launch` (the same launch, as slurm/launch.sh runs it) the launcher exits 75
  too, its last line saying where the checkpoint is, and the run directory holds the requeue mark.
- A rank that stalls (SIGSTOP) or dies (SIGKILL) while the others wait in a collective: the others
  fail within train.dist_timeout seconds instead of hanging. The ranks are started as separate
  processes (RANK, WORLD_SIZE, MASTER_ADDR), as on separate nodes, with no agent to clean up.
"""
import os
import re
import signal
import socket
import time

import pytest

from pipeline.rundir import REQUEUE_MARK
from test_faults_harness import (LAUNCH_NOISE, STEPS, freeze, kill_group, process_tree, read_from, relative_files, run,
                                 signal_tree, start, tail, train_command, train_env, wait_gone,
                                 whole_state_problems)

pytestmark = pytest.mark.slow

JOINT_ONLY = ["stages.warmup.epochs=0", "stages.joint.milestones=[]"]
STOPPED = r"joint: stop requested; checkpoint written at step (\d+); exiting for requeue"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "cifar"


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.002)


def checkpoint_files(run_dir):
    """The files of a complete checkpoint of this run, for whole_state_problems."""
    for stage in STEPS:
        found = sorted((run_dir / stage / "checkpoints").glob("step-*"))
        if found:
            return relative_files(found[0])
    raise AssertionError(f"no checkpoint in {run_dir}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_within_seconds_and_exits_75(data_dir, tmp_path, sig):
    """One process (7 steps per epoch): the signal after the first checkpoint stops it mid-epoch."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = train_command(run_dir, data_dir, *JOINT_ONLY, "stages.joint.epochs=1", processes=1)
    proc = start(cmd, log)
    wait_for(run_dir / "joint" / "checkpoints" / "step-00000001", proc)
    signalled = time.time()
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=120)
    seconds = time.time() - signalled
    out = read_from(log)
    assert code == 75, tail(out)
    stopped = re.search(STOPPED, out)
    assert stopped, tail(out)
    assert seconds < 30, f"{seconds:.0f} s from the signal to the exit"
    step = int(stopped.group(1))
    assert 1 < step < 7 and (run_dir / "joint" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert whole_state_problems(run_dir, checkpoint_files(run_dir)) == []
    if sig == signal.SIGUSR1:  # requeued: the same command resumes from that checkpoint and completes
        code, out = run(cmd, log, check=0)
        assert f"joint: resumed from {run_dir}/joint/checkpoints/step-{step:08d}" in out
        assert (run_dir / "joint" / "final" / "manifest.json").is_file()


def last_line(text):
    return text.rstrip().splitlines()[-1]


def requeue_line(run_dir, step):
    return f"stopped for requeue: checkpoint at step {step} (joint) in {run_dir}; rerun the same command to resume"


def test_a_launched_run_stops_for_requeue_with_one_line_and_exit_75(data_dir, tmp_path):
    """`python -m pipeline.launch` with the one-process config (accelerate's own launcher, no
    torchrun), the progress bar on: SIGUSR1 to the worker; the launch ends with one line and exit
    75, and prints none of the warnings of issue #25. The same command then completes the stage."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = train_command(run_dir, data_dir, *JOINT_ONLY, "stages.joint.epochs=1", "train.progress=true",
                        "train.log_every=1", processes=1, launcher="pipeline.launch")
    proc = start(cmd, log)
    wait_for(run_dir / "joint" / "checkpoints" / "step-00000001", proc)
    for pid in process_tree(proc.pid)[1:]:
        os.kill(pid, signal.SIGUSR1)
    code = proc.wait(timeout=120)
    out = read_from(log)
    stopped = re.search(STOPPED, out)
    assert code == 75 and stopped, tail(out)
    assert last_line(out) == requeue_line(run_dir, stopped.group(1)), tail(out)
    assert (run_dir / REQUEUE_MARK).is_file()
    assert [noise for noise in LAUNCH_NOISE if noise in out] == [], tail(out)
    code, out = run(cmd, log, check=0)
    assert "joint: resumed from" in out and (run_dir / "joint" / "final" / "manifest.json").is_file()
    assert not (run_dir / REQUEUE_MARK).exists()  # removed when the rerun started


def test_the_launcher_forwards_sigterm_and_the_workers_exit_75(data_dir, tmp_path):
    """2 processes, 15 steps, SIGTERM three ways; each time both workers checkpoint and exit 75.
    - to the workers (as torchrun forwards it), under `accelerate launch`: it exits 1 and lists
      `exitcode : 75` twice; under `python -m pipeline.launch`: it exits 75, its last line says where
      the checkpoint is;
    - to the launcher (`python -m pipeline.launch`): torchrun forwards it and waits for the workers;
      75 and that line, read from the run's requeue mark;
    - to all at once (as `scancel --signal=TERM` does): the same.
    Then SIGKILL to the launcher alone: its workers die with it (they do not train on, unseen)."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    ckpt_dir = run_dir / "joint" / "checkpoints"
    targets = [("workers", "accelerate"), ("workers", "pipeline.launch"), ("launcher", "pipeline.launch"),
               ("all", "pipeline.launch"), ("kill launcher", "pipeline.launch")]
    for target, launcher in targets:
        cmd = train_command(run_dir, data_dir, *JOINT_ONLY, "stages.joint.epochs=6", launcher=launcher)
        offset = log.stat().st_size if log.exists() else 0
        done = {p.name for p in ckpt_dir.glob("step-*")}
        proc = start(cmd, log)
        while not {p.name for p in ckpt_dir.glob("step-*")} - done:  # a new checkpoint: training is under way
            assert proc.poll() is None, tail(read_from(log, offset))
            time.sleep(0.01)
        signalled = time.time()
        if target == "kill launcher":
            proc.kill()
            proc.wait()
            wait_gone(run_dir, timeout=5)
            assert whole_state_problems(run_dir, checkpoint_files(run_dir)) == []
            continue
        pids = {"workers": process_tree(proc.pid)[1:], "launcher": [proc.pid], "all": process_tree(proc.pid)}
        for pid in pids[target]:
            os.kill(pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
        seconds = time.time() - signalled
        out = read_from(log, offset)
        stopped = re.search(STOPPED, out)
        assert stopped and (ckpt_dir / f"step-{int(stopped.group(1)):08d}").is_dir(), tail(out)
        assert (run_dir / REQUEUE_MARK).is_file()
        if launcher == "accelerate":
            assert code == 1, tail(out)  # torchrun: "a worker did not exit 0"
            summary = re.findall(r"^\s*exitcode\s+:\s+(-?\d+) \(pid", out, re.MULTILINE)  # one line per worker
            assert summary == ["75", "75"], tail(out)
        else:
            assert code == 75 and last_line(out) == requeue_line(run_dir, stopped.group(1)), tail(out)
            assert [noise for noise in LAUNCH_NOISE if noise in out] == [], tail(out)
        if target != "workers":
            assert "closing signal SIGTERM" in out, tail(out)  # torchrun forwarded it
            assert "forcefully exiting via SIGKILL" not in out, tail(out)  # the workers ended by themselves
        assert seconds < 60, f"{seconds:.0f} s from SIGTERM to exit"
        wait_gone(run_dir)
        assert whole_state_problems(run_dir, checkpoint_files(run_dir)) == []
    code, out = run(cmd, log, check=0)
    assert "joint: resumed from" in out and (run_dir / "joint" / "final" / "manifest.json").is_file()


def test_a_stop_signal_at_the_end_of_the_warmup_is_not_lost(data_dir, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = train_command(run_dir, data_dir, "stages.joint.epochs=1", "stages.joint.milestones=[]",
                        "data.batch_size=32", processes=1)  # 3 steps per epoch
    proc = start(cmd, log)
    wait_for(run_dir / "warmup" / "checkpoints" / "step-00000003", proc)  # the warm-up's last checkpoint
    freeze(proc)  # deliver the signal at exactly this point
    os.kill(proc.pid, signal.SIGTERM)
    signal_tree(proc, signal.SIGCONT)
    code = proc.wait(timeout=300)
    assert code == 75, tail(read_from(log))
    assert not (run_dir / "joint" / "final").exists()


# ------------------------------------------------------------------ a rank lost in a collective

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault", ["stalled", "killed"])
def test_a_lost_rank_makes_the_other_fail_within_dist_timeout(data_dir, tmp_path, fault):
    timeout = 10
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, data_dir, *JOINT_ONLY, f"train.dist_timeout={timeout}", processes=1)
    port = str(free_port())
    ranks = [start(cmd, tmp_path / f"rank{rank}.log",
                   env=train_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=port, OMP_NUM_THREADS="1"))
             for rank in (0, 1)]
    try:
        wait_for(run_dir / "joint" / "checkpoints" / "step-00000001", ranks[0])
        lost = time.time()
        if fault == "stalled":
            freeze(ranks[1])  # alive, connections open, never answers
        else:
            kill_group(ranks[1])
        code = ranks[0].wait(timeout=timeout + 120)
        seconds = time.time() - lost
    finally:
        for proc in ranks:
            kill_group(proc)
    out = read_from(tmp_path / "rank0.log")
    assert code not in (0, 75), tail(out)
    if fault == "stalled":
        assert re.search(rf"Timed out waiting {timeout * 1000}ms", out), tail(out)
        assert timeout <= seconds < timeout + 60, f"rank 0 failed {seconds:.0f} s after rank 1 stalled"
    else:
        assert re.search(r"Connection (closed|reset) by peer", out), tail(out)
        assert seconds < timeout + 60, f"rank 0 failed {seconds:.0f} s after rank 1 died"
    wait_gone(run_dir)
    assert whole_state_problems(run_dir, checkpoint_files(run_dir)) == []
