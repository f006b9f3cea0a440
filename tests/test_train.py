"""Real runs of pipeline/train.py on the CPU: 2 processes, DeepSpeed ZeRO-2 through accelerate (and one
process on ZeRO-0, as the CIFAR jobs run).

One uninterrupted run is the reference; an interrupted-and-resumed run and a killed-and-rerun run
must reach bitwise the same final weights (deterministic mode).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_faults_harness import LAUNCH_NOISE

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
TINY = ["data.generated_size=8", "data.generated_val_size=4", "data.batch_size=16", "data.eval_batch_size=20",
        "stages.warmup.epochs=1", "stages.joint.epochs=2", "stages.joint.milestones=[1]",
        "train.checkpoint_every=2", "train.deterministic=true", "train.progress=false", "model.d=32",
        "stages.joint.hard_tail=0.5"]  # the second joint epoch with hard decisions: resumes cross the switch
# Every test that trains is marked slow; the two that are refused before any training stay in make test-fast.


def sets(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


def train(run_dir, data_dir, *extra, processes=2, timeout=600, check=None, args=()):
    # as from a shell: importing torch here set TORCHINDUCTOR_CACHE_DIR, which would override the run's own
    env = dict({k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}, PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cpu")
    launcher = ([str(ACCELERATE), "launch", "--config_file", "jobs/accelerate/cpu.yaml",
                 "--num_processes", str(processes)] if processes > 1 else [sys.executable])
    cmd = launcher + ["pipeline/train.py", "--run-dir", str(run_dir), *args,
                      *sets(f"data.root={data_dir}", *TINY, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"exit {proc.returncode} != {check}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}")
    return proc


def manifest(run_dir, stage):
    return json.loads((Path(run_dir) / stage / "final" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "cifar"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("reference") / "run"
    # the progress bar shown and updated at every step, as in a launch from a terminal (the weights
    # do not depend on it)
    proc = train(run, data_dir, "train.progress=true", "train.log_every=1", check=0)
    return run, proc


@pytest.mark.slow
def test_two_process_deepspeed_run_completes_both_stages(reference):
    run, proc = reference
    out = proc.stdout + proc.stderr
    assert "2 process(es), DeepSpeed ZeRO-2" in out
    assert [noise for noise in LAUNCH_NOISE if noise in out] == [], out[-6000:]
    assert "blocks initialised from" in out
    assert "joint: epochs 2-2 train with hard decisions" in out
    for stage in ("warmup", "joint"):
        m = manifest(run, stage)
        assert m["world_size"] == 2 and m["stage"] == stage
        assert (run / stage / "final" / "model.safetensors").is_file()
        assert 0.0 <= m["metrics"]["top1"] <= 1.0 and m["metrics"]["samples"] == 40
    assert manifest(run, "warmup")["metrics"]["ratio"] == pytest.approx(1.0)  # evaluated as the full network
    assert 0 < manifest(run, "joint")["metrics"]["ratio"] <= 1.0 + 1e-6
    assert list((run / "tensorboard" / "joint").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    # the lr schedule counts each rank's steps once (accelerate's default steps it once per process)
    for stage in ("warmup", "joint"):
        last = max((run / stage / "checkpoints").glob("step-*"))
        assert torch.load(last / "scheduler.bin")["last_epoch"] == manifest(run, stage)["steps"], stage


@pytest.mark.slow
def test_rerunning_a_complete_run_does_nothing(reference, data_dir):
    run, _ = reference
    before = manifest(run, "joint")["weights_sha256"]
    proc = train(run, data_dir, processes=1, check=0)
    assert proc.stdout.count("already complete") == 2
    assert manifest(run, "joint")["weights_sha256"] == before


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_weights(reference, data_dir, tmp_path):
    run = tmp_path / "run"
    # warm-up has 2 steps per epoch x 1 epoch, so step 4 is inside the first joint epoch
    first = train(run, data_dir, "train.stop_at_step=3", args=["--stage", "warmup"], check=0)
    assert "complete" in first.stdout + first.stderr
    stopped = train(run, data_dir, "train.stop_at_step=1")
    assert "exiting for requeue" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    assert (run / "joint" / "checkpoints").is_dir() and not (run / "joint" / "final").exists()
    train(run, data_dir, check=0)
    ref, _ = reference
    for stage in ("warmup", "joint"):
        assert manifest(run, stage)["weights_sha256"] == manifest(ref, stage)["weights_sha256"], stage


@pytest.mark.slow
def test_zero0_run_stopped_mid_epoch_resumes_to_identical_weights(data_dir, tmp_path):
    """The CIFAR jobs' engine, on one process: ZeRO-0, channels_last weights, and the torch SGD's
    momentum restored from the checkpoint into them. train.cuda_graph, on: without a GPU it
    says so and trains uncaptured."""
    zero0 = ("train.deepspeed_config=jobs/deepspeed/zero0.json", "train.cuda_graph=true")
    whole, run = tmp_path / "whole", tmp_path / "resumed"
    proc = train(whole, data_dir, *zero0, processes=1, check=0)
    assert "joint: train.cuda_graph: not captured: no GPU" in proc.stdout + proc.stderr
    stopped = train(run, data_dir, *zero0, "train.stop_at_step=3", processes=1)  # warm-up has 5 steps here
    assert "exiting for requeue" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    resumed = train(run, data_dir, *zero0, processes=1, check=0)
    assert "warmup: resumed from" in resumed.stdout + resumed.stderr  # not started over
    for stage in ("warmup", "joint"):
        assert manifest(run, stage)["weights_sha256"] == manifest(whole, stage)["weights_sha256"], stage


@pytest.mark.slow
def test_killed_mid_joint_then_rerun_finishes_identically(reference, data_dir, tmp_path):
    run = tmp_path / "run"
    train(run, data_dir, args=["--stage", "warmup"], check=0)
    # as from a shell: importing torch here set TORCHINDUCTOR_CACHE_DIR, which would override the run's own
    env = dict({k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}, PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cpu")
    cmd = [str(ACCELERATE), "launch", "--config_file", "jobs/accelerate/cpu.yaml", "pipeline/train.py",
           "--run-dir", str(run), *sets(f"data.root={data_dir}", *TINY)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = run / "joint" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("step-*")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpts.glob("step-*")), "no joint checkpoint appeared before the deadline"
    assert not (run / "joint" / "final").exists()
    train(run, data_dir, check=0)
    ref, _ = reference
    assert manifest(run, "joint")["weights_sha256"] == manifest(ref, "joint")["weights_sha256"]


def test_joint_before_warmup_names_the_command(tmp_path, data_dir):
    proc = train(tmp_path / "run", data_dir, processes=1, args=["--stage", "joint"], check=2)
    assert "--stage warmup" in proc.stderr and "warmup" in proc.stderr


@pytest.mark.slow
def test_run_dir_of_another_job_is_refused(reference, data_dir):
    run, _ = reference
    proc = train(run, data_dir, "job=other", processes=1, check=2)
    assert "belongs to job 'demo'" in proc.stderr


@pytest.mark.slow
def test_run_dir_with_another_model_is_refused(reference, data_dir):
    run, _ = reference
    proc = train(run, data_dir, "model.arch=resnet32", processes=1, check=2)
    assert "model.arch: 'resnet20' (saved) -> 'resnet32' (this run)" in proc.stderr


@pytest.mark.slow
def test_a_changed_setting_is_refused_naming_it_and_the_saved_config_is_kept(reference, data_dir):
    run, _ = reference
    saved = (run / "config.yaml").read_bytes()
    proc = train(run, data_dir, "optim.lr=0.2", "loss.t=0.7", processes=1, check=2)
    assert "optim.lr: 0.05 (saved) -> 0.2 (this run)" in proc.stderr
    assert "loss.t: 0.6 (saved) -> 0.7 (this run)" in proc.stderr and "another --run-dir" in proc.stderr
    assert (run / "config.yaml").read_bytes() == saved


@pytest.mark.slow
def test_a_moved_dataset_resumes_the_stage_and_is_saved_with_a_stage_eta(data_dir, tmp_path):
    run, moved = tmp_path / "run", tmp_path / "moved"
    train(run, data_dir, "train.stop_at_step=1", processes=1, args=["--stage", "warmup"], check=75)
    first = yaml.safe_load((run / "config.yaml").read_text())
    shutil.copytree(data_dir, moved)
    proc = train(run, moved, "train.progress=true", "train.log_every=1", processes=1, args=["--stage", "warmup"],
                 check=0)
    assert f"note: resuming with data.root '{data_dir}' -> '{moved}'" in proc.stdout
    assert "warmup: resumed from" in proc.stdout + proc.stderr
    # 5 steps an epoch, 1 restored: the pace is of the 4 run here, and the stage's last epoch leaves none
    assert re.search(r"^warmup epoch 1/1: trained 64 images in .* stage ETA 00:00$", proc.stdout, re.M), proc.stdout
    assert "warmup 1/1, stage ETA " in proc.stderr  # the bar's label
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == str(moved)
    assert saved["train"] == {**first["train"], "stop_at_step": 0, "progress": True, "log_every": 1}
    assert {**saved, "data": None, "train": None} == {**first, "data": None, "train": None}


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error(tmp_path):
    """...and a start that fails leaves no run directory (no config.yaml, no compile cache)."""
    proc = train(tmp_path / "run", tmp_path / "nowhere", "data.generate=false", "train.compile=default",
                 processes=1, check=2)
    assert "nowhere" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_failed_start_in_a_run_dir_with_a_handed_on_warmup_leaves_only_the_warmup(reference, tmp_path):
    """As pipeline.sweep hands a shared warm-up on: the joint stage finds no data and writes nothing."""
    ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref / "warmup" / "final", run / "warmup" / "final")
    proc = train(run, tmp_path / "nowhere", "data.generate=false", "train.compile=default", processes=1, check=2)
    assert "nowhere" in proc.stderr
    assert [p.relative_to(run).as_posix() for p in sorted(run.rglob("*"))] == [
        "warmup", "warmup/final", "warmup/final/manifest.json", "warmup/final/model.safetensors"]


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_terms_and_keeps_what_was_saved(tmp_path, data_dir):
    run = tmp_path / "run"
    train(tmp_path / "warm", data_dir, processes=1, args=["--stage", "warmup"], check=0)
    # another optim.lr is another run: the warm-up is handed on to a new run directory, as a sweep does
    shutil.copytree(tmp_path / "warm" / "warmup", run / "warmup")
    warm = manifest(run, "warmup")["weights_sha256"]
    proc = train(run, data_dir, "optim.lr=1.0e+30", processes=1, check=1)
    assert "non-finite loss at step" in proc.stderr and "'cls'" in proc.stderr
    assert manifest(run, "warmup")["weights_sha256"] == warm
    assert sorted((run / "warmup" / "checkpoints").glob("step-*"))
    assert not (run / "joint" / "final").exists()


@pytest.mark.slow
def test_compiled_training_runs_both_stages_and_evaluates_eagerly(data_dir, tmp_path):
    run = tmp_path / "compiled"
    proc = train(run, data_dir, "train.compile=default", "train.deterministic=false", processes=1, check=0)
    out = proc.stdout + proc.stderr
    assert "mode uniform" in out and "mode joint" in out and out.count("compile default") == 2
    assert [noise for noise in LAUNCH_NOISE if noise in out] == [], out[-6000:]  # Dynamo's lru_cache warning
    metrics = manifest(run, "joint")["metrics"]
    # evaluation (eager, real skipping) of the compiled model: hard 0/1 decisions, a finite result
    assert metrics["samples"] == 40 and 0 <= metrics["exec_rate"] <= 1 and 0 <= metrics["top1"] <= 1
    # a stage run again (as after preemption, on any node that sees the run directory) loads its
    # compiled graphs from the run directory's cache instead of compiling them again
    assert f"in {run.resolve() / 'compile_cache'}, " in out
    shutil.rmtree(run / "joint")
    again = train(run, data_dir, "train.compile=default", "train.deterministic=false", processes=1, check=0)
    line = next(line for line in (again.stdout + again.stderr).splitlines() if "joint: torch.compile:" in line)
    loaded, built = int(line.split()[2]), int(line.split()[-2])
    assert loaded > 0 and built == 0, line


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_and_plots(reference, data_dir, tmp_path):
    run, _ = reference
    out = tmp_path / "acc_vs_cost.png"
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--run-dir", str(run), "--run-dir", str(run),
                           "--stage", "joint", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "joint" / "eval.json").read_text())
    trained = manifest(run, "joint")["metrics"]
    # The export evaluated on one process gives what the 2-process run measured at its end; other
    # batch compositions change float round-off, which can flip a router decision at a near tie.
    assert metrics["samples"] == trained["samples"] == 40
    assert metrics["top1"] == pytest.approx(trained["top1"], abs=0.05)
    assert metrics["ratio"] == pytest.approx(trained["ratio"], abs=0.02)
    assert len(metrics["block_rates"]) == len(metrics["block_indecisive_share"]) == 9
    assert 0 <= metrics["indecisive_share"] <= 1 and metrics["top1_soft"] - metrics["top1"] == pytest.approx(
        metrics["soft_gap"])
    assert (run / "joint" / "block_rates.png").stat().st_size > 1000
    assert (run / "joint" / "path_groups.png").stat().st_size > 1000
    # a human table and the paths written; no accuracy-vs-cost plot without a static run to judge against
    assert proc.stdout.splitlines()[0].split()[:3] == ["run", "top-1", "top-5"]
    assert "run/joint" in proc.stdout and str(run / "joint" / "eval.json") in proc.stdout
    assert not out.exists() and "not drawn" in proc.stdout


def test_evaluate_cli_on_an_unfinished_run_says_what_to_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--run-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has not completed" in proc.stderr
