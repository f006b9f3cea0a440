"""The slurm/ templates on a real SLURM cluster started here (slurmctld + 2 slurmd, see slurm_cluster.py).

Each test submits the real templates (sbatch slurm/<template>.sh, or bash slurm/<template>.sh) with
the demo job made tiny, on 2 CPU "nodes" with one training process each, and checks what SLURM and
the run directory say afterwards: stages as chained jobs, the joint job after a successful warm-up
and from its hand-off, a failed warm-up cancelling the joint job, a signalled job checkpointing,
requeueing and ending with the same weights as an unsignalled run, re-submission doing nothing, and
bad input refused before anything is queued.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_installed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# The demo job, tiny: 10 steps per epoch (80 images, 4 per process x 2 processes); warm-up 10 steps,
# joint 20 steps.
TINY = ["data.generated_size=8", "data.generated_val_size=4", "data.batch_size=4",
        "stages.warmup.epochs=1", "stages.joint.epochs=2", "train.checkpoint_every=3",
        "train.deterministic=true", "train.progress=false"]
# A CPU partition: the templates' GPU, CPU and time requests overridden on the command line.
CPU_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=debug", "--time=20"]
WAIT_S = 600  # generous: CI machines are shared; a hang still ends with the jobs' states


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_installed()
    except ClusterUnavailable as why:
        pytest.skip(str(why))
    started = SlurmCluster(nodes=2, cpus_per_node=2)
    try:
        started.start()
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-runs")
    (folder / "data").mkdir()  # the demo writes its generated CIFAR data here on first use
    return folder


def job_env(cluster: SlurmCluster, work: Path, run_dir: Path, sets: list[str], data_root: Path | None = None) -> dict:
    """The variables a user would edit in a template, given through the environment."""
    return {**cluster.env, "JOB": "jobs/demo.yaml", "RUN_DIR": str(run_dir),
            "DATA_ROOT": str(data_root or work / "data"), "VENV": sys.prefix,
            "EXTRA_ARGS": " ".join(f"--set {s}" for s in sets),
            "SBATCH_OUTPUT": str(work / "slurm-%x-%j.out")}  # keep slurm-*.out out of the repository


def sbatch(cluster, template: str, env: dict) -> str:
    """`sbatch slurm/<template>.sh`, the user's command, from the repository root; the job id."""
    done = cluster.run("sbatch", "--parsable", *CPU_NODES, f"slurm/{template}.sh", env=env, cwd=REPO)
    return done.stdout.strip().split(";")[0]


def submit_script(template: str, env: dict, *sbatch_options: str) -> subprocess.CompletedProcess:
    """`bash slurm/<template>.sh`: checks, then submits every pending stage."""
    return subprocess.run(["bash", f"slurm/{template}.sh", *sbatch_options], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def submitted(text: str) -> dict[str, str]:
    """{'warmup': '12', 'joint': '13'} from the launcher's 'submitted <stage> job <id>' lines."""
    return dict(re.findall(r"^submitted (\w+) job (\d+)", text, re.M))


def stdout_of(cluster, job_id: str) -> Path:
    return Path(cluster.job(job_id)["StdOut"])


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} does not exist>"


def wait_for(condition, what: str, timeout: float = WAIT_S, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def chained_job(cluster, first: str, stage: str) -> str:
    """The id of the job `first` submitted for `stage` (sbatch slurm/... chains the later stages)."""
    out = stdout_of(cluster, first)
    return wait_for(lambda: submitted(read(out)).get(stage), f"job {first} to submit its {stage} job")


def when(field: str) -> datetime:
    return datetime.fromisoformat(field)


def final_sha(run_dir: Path, stage: str) -> str:
    return json.loads((run_dir / stage / "final" / "manifest.json").read_text())["weights_sha256"]


@dataclass
class Run:
    run_dir: Path
    warmup: str
    joint: str
    jobs: dict


def test_bad_input_is_refused_before_anything_is_queued(cluster, work):
    not_a_dir = work / "a-file"
    not_a_dir.write_text("")
    cases = [  # (what is wrong, env, sbatch options, exit code, message)
        ("run dir not writable", job_env(cluster, work, not_a_dir / "run", TINY), CPU_NODES, 2,
         "cannot create run directory"),
        ("data root missing", job_env(cluster, work, work / "bad", TINY, data_root=work / "no-such-data"),
         CPU_NODES, 2, f"data root {work / 'no-such-data'} does not exist"),
        ("unknown config key", job_env(cluster, work, work / "bad", TINY + ["train.no_such_key=1"]), CPU_NODES, 2,
         "unknown config key 'train.no_such_key'"),
        ("more nodes than the partition has", job_env(cluster, work, work / "bad", TINY), CPU_NODES + ["--nodes=3"],
         1, "but will never start it (PartitionConfig)"),
        ("a GPU the partition does not have", job_env(cluster, work, work / "bad", TINY),
         CPU_NODES + ["--gpus-per-node=1"], 1, "sbatch refused the warmup job"),
    ]
    for what, env, options, code, message in cases:
        done = submit_script("cifar10_r110", env, *options)
        assert done.returncode == code, f"{what}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert message in done.stderr, f"{what}: {done.stderr}"
        assert not submitted(done.stdout), f"{what}: a job was submitted: {done.stdout}"
    assert "Invalid generic resource (gres) specification" in done.stderr  # sbatch's own reason, surfaced
    assert cluster.run("squeue", "-h").stdout.strip() == ""

    # sbatch directly: the job itself fails at once, the reason in its log, and chains nothing.
    env = job_env(cluster, work, work / "bad", TINY, data_root=work / "no-such-data")
    job_id = sbatch(cluster, "cifar10_r110", env)
    info = cluster.wait_done([job_id], timeout=120)[job_id]
    log = read(Path(info["StdOut"]))
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"data root {work / 'no-such-data'} does not exist" in log and not submitted(log)


@pytest.fixture(scope="module")
def reference_run(cluster, work) -> Run:
    """`sbatch slurm/imagenet_r101.sh` (the 2-node template) run to the end without interruption."""
    run_dir = work / "reference"
    warmup = sbatch(cluster, "imagenet_r101", job_env(cluster, work, run_dir, TINY))
    joint = chained_job(cluster, warmup, "joint")
    jobs = cluster.wait_done([warmup, joint], timeout=WAIT_S)
    return Run(run_dir, warmup, joint, jobs)


def test_stages_run_as_chained_jobs_joint_from_the_warmup_handoff(reference_run):
    run, warm, joint = reference_run, reference_run.jobs[reference_run.warmup], reference_run.jobs[reference_run.joint]
    warm_log = read(run.run_dir / "logs" / f"warmup-{run.warmup}.log")
    joint_log = read(run.run_dir / "logs" / f"joint-{run.joint}.log")
    assert (warm["JobState"], warm["ExitCode"]) == ("COMPLETED", "0:0"), warm_log
    assert (joint["JobState"], joint["ExitCode"]) == ("COMPLETED", "0:0"), joint_log
    # Two jobs, in order: the joint job was queued while the warm-up ran, and started after it ended.
    assert when(joint["SubmitTime"]) < when(warm["EndTime"]) <= when(joint["StartTime"])
    # The warm-up job chained the joint one with its own allocation (the command line's, not the #SBATCH lines).
    assert (warm["NumNodes"], warm["TimeLimit"], warm["Partition"]) == (joint["NumNodes"], joint["TimeLimit"],
                                                                       joint["Partition"]) == ("2", "00:20:00", "debug")
    assert "2 node(s) x 1 process(es) (CPU)" in warm_log
    assert "warmup: complete" in warm_log and "joint:" not in warm_log
    assert f"joint: blocks initialised from {run.run_dir / 'warmup' / 'final'}" in joint_log
    for stage in ("warmup", "joint"):
        assert (run.run_dir / stage / "final" / "model.safetensors").is_file()


def test_resubmitting_a_finished_run_does_nothing(cluster, work, reference_run):
    run_dir = reference_run.run_dir
    finals = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/final/*")}
    env = job_env(cluster, work, run_dir, TINY)

    done = submit_script("imagenet_r101", env, *CPU_NODES)
    assert done.returncode == 0, done.stderr
    assert f"all stages of {REPO / 'jobs/demo.yaml'} are complete in {run_dir}: nothing to submit" in done.stdout
    assert not submitted(done.stdout)

    job_id = sbatch(cluster, "imagenet_r101", env)
    info = cluster.wait_done([job_id], timeout=120)[job_id]
    log = read(Path(info["StdOut"]))
    assert info["JobState"] == "COMPLETED", log
    assert f"are complete in {run_dir}: nothing to do" in log and not submitted(log)
    assert cluster.run("squeue", "-h").stdout.strip() == ""
    assert finals == {p: p.stat().st_mtime_ns for p in run_dir.glob("*/final/*")}


def test_failed_warmup_cancels_the_joint_job(cluster, work):
    # A data root that exists but holds no dataset (generation off): only train.py on the nodes finds out.
    empty = work / "empty-data"
    empty.mkdir()
    run_dir = work / "failing"
    env = job_env(cluster, work, run_dir, TINY + ["data.generate=false"], data_root=empty)
    done = submit_script("cifar10_r110", env, *CPU_NODES)
    assert done.returncode == 0, done.stderr
    ids = submitted(done.stdout)
    assert list(ids) == ["warmup", "joint"], done.stdout
    assert f"submitted joint job {ids['joint']} (starts after job {ids['warmup']} succeeds)" in done.stdout
    jobs = cluster.wait_done([ids["warmup"], ids["joint"]], timeout=WAIT_S)
    warm, joint = jobs[ids["warmup"]], jobs[ids["joint"]]
    warm_log = read(run_dir / "logs" / f"warmup-{ids['warmup']}.log")
    assert warm["JobState"] == "FAILED", warm_log
    assert "error: " in warm_log and "warmup failed" in warm_log
    assert (joint["JobState"], joint["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
    # It never ran: no nodes, no batch host, no output file.
    assert joint["NodeList"] in ("", "(null)") and "BatchHost" not in joint, joint
    assert not Path(joint["StdOut"]).exists()
    assert not (run_dir / "logs" / f"joint-{ids['joint']}.log").exists()
    assert not (run_dir / "joint").exists()


def test_signalled_job_checkpoints_requeues_and_ends_like_an_unsignalled_run(cluster, work, reference_run):
    run_dir = work / "signalled"
    # Also stop the joint stage at step 13 (train.stop_at_step: checkpoint, exit 75, no signal):
    # the template must requeue on that exit too. The warm-up (10 steps) never reaches step 13.
    env = job_env(cluster, work, run_dir, TINY + ["train.stop_at_step=13"])
    warmup = sbatch(cluster, "imagenet_r101", env)
    wait_for(lambda: list((run_dir / "warmup" / "checkpoints").glob("step-*")), "the first warm-up checkpoint")
    # What `#SBATCH --signal=B:USR1@180` does before the time limit: SIGUSR1 to the batch shell only.
    cluster.run("scancel", "--batch", "--signal=USR1", warmup)
    joint = chained_job(cluster, warmup, "joint")
    jobs = cluster.wait_done([warmup, joint], timeout=WAIT_S)

    warm_log = read(run_dir / "logs" / f"warmup-{warmup}.log")
    joint_log = read(run_dir / "logs" / f"joint-{joint}.log")
    assert (jobs[warmup]["JobState"], jobs[warmup]["Restarts"]) == ("COMPLETED", "1"), warm_log
    for line in ("received SIGUSR1", "warmup: stop requested; checkpoint written at step",
                 f"requeueing job {warmup}", f"== warmup job {warmup} attempt 2", "warmup: resumed from",
                 "warmup: complete"):
        assert line in warm_log, f"{line!r} not in the warm-up log:\n{warm_log[-3000:]}"
    stopped_at = int(re.search(r"warmup: stop requested; checkpoint written at step (\d+)", warm_log).group(1))
    assert 0 < stopped_at < 10  # mid-stage
    assert (jobs[joint]["JobState"], jobs[joint]["Restarts"]) == ("COMPLETED", "1"), joint_log
    assert when(jobs[joint]["StartTime"]) >= when(jobs[warmup]["EndTime"])  # not while the warm-up was requeued
    for line in ("joint: stop requested; checkpoint written at step 13",
                 f"stopped for requeue: checkpoint at step 13 (joint) in {run_dir}", f"requeueing job {joint}",
                 f"== joint job {joint} attempt 2", "joint: resumed from", "joint: complete"):
        assert line in joint_log, f"{line!r} not in the joint log:\n{joint_log[-3000:]}"
    assert "received SIG" not in joint_log
    # The requeued warm-up job did not chain a second joint job.
    assert read(stdout_of(cluster, warmup)).count("submitted joint job") == 1

    for stage in ("warmup", "joint"):
        assert final_sha(run_dir, stage) == final_sha(reference_run.run_dir, stage), stage
