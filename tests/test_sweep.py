"""pipeline.sweep on the CPU: rows run side by side, one shared warm-up, a stopped sweep resumes."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.sweep import plan

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.generated_size=8", "data.generated_val_size=4", "data.batch_size=16", "data.eval_batch_size=20",
        "train.progress=false", "model.d=32"]
SHORT = "{warmup: {epochs: 1}, joint: {epochs: 1, milestones: []}}"

pytestmark = pytest.mark.slow


def write_rows(folder: Path) -> list[Path]:
    demo = REPO / "jobs" / "demo.yaml"
    rows = {"t06": f"loss: {{t: 0.6}}\nstages: {SHORT}", "usw": f"model: {{gamma: 0.0}}\nloss: {{alpha: 0.0}}\nstages: {SHORT}",
            "static": "stages: {warmup: {epochs: 0}, joint: {epochs: 1, milestones: [], mode: full}}"}
    paths = []
    for name, body in rows.items():
        path = folder / f"{name}.yaml"
        path.write_text(f"extends: {demo}\njob: sweep_{name}\n{body}\n")
        paths.append(path)
    return paths


def sweep(runs_dir, jobs, data_dir, *extra):
    sets = [arg for item in [f"data.root={data_dir}", *TINY, *extra] for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "pipeline.sweep", "--runs-dir", str(runs_dir), *map(str, jobs), *sets]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_plan_shares_identical_warmups_only(tmp_path):
    jobs = write_rows(tmp_path)
    runs = {r.name: r for r in plan(jobs, ["data.root=x"], tmp_path / "runs")}
    assert set(runs) == {"warmup-t06", "t06", "usw", "static"}
    assert runs["warmup-t06"].stage == "warmup"
    assert runs["t06"].needs == runs["usw"].needs == "warmup-t06"  # routers and losses do not matter
    assert runs["static"].needs is None
    other = tmp_path / "other.yaml"
    other.write_text(f"extends: {jobs[0]}\njob: sweep_other\noptim: {{lr: 0.01}}\n")
    runs = {r.name: r for r in plan([*jobs, other], ["data.root=x"], tmp_path / "runs")}
    assert runs["other"].needs == "warmup-other"  # another optimiser: a warm-up of its own
    gates = tmp_path / "gates.yaml"  # the routers' gates and norm: frozen and unused in USW
    gates.write_text(f"extends: {jobs[0]}\njob: sweep_gates\nmodel: {{router_norm: none, straight_through: true}}\n")
    runs = {r.name: r for r in plan([*jobs, gates], ["data.root=x"], tmp_path / "runs")}
    assert runs["gates"].needs == "warmup-t06"


def test_sweep_stops_resumes_and_hands_one_warmup_to_every_row(tmp_path):
    jobs = write_rows(tmp_path)
    runs_dir, data_dir = tmp_path / "runs", tmp_path / "data"
    stopped = sweep(runs_dir, jobs, data_dir, "train.stop_at_step=2")
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    record = json.loads((runs_dir / "sweep.json").read_text())["runs"]
    assert record["warmup-t06"]["status"] == "stopped" and record["t06"]["status"] == "pending"

    done = sweep(runs_dir, jobs, data_dir)
    assert done.returncode == 0, done.stdout + done.stderr + (runs_dir / "logs" / "t06.log").read_text()[-3000:]
    record = json.loads((runs_dir / "sweep.json").read_text())
    assert {r["status"] for r in record["runs"].values()} == {"done"}
    assert all(r["wall_s"] > 0 for r in record["runs"].values())
    shared = (runs_dir / "warmup-t06" / "warmup" / "final" / "manifest.json").read_text()
    for row in ("t06", "usw"):
        assert (runs_dir / row / "warmup" / "final" / "manifest.json").read_text() == shared
        assert (runs_dir / row / "joint" / "final" / "manifest.json").is_file()
    assert not (runs_dir / "static" / "warmup").exists()

    again = sweep(runs_dir, jobs, data_dir)
    assert again.returncode == 0 and "started" not in again.stdout

    evaluated = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--path-groups", "2",
                                *[arg for row in ("t06", "usw", "static") for arg in ("--run-dir", str(runs_dir / row))]],
                               cwd=REPO, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (runs_dir / "t06" / "accuracy_vs_cost.png").stat().st_size > 1000  # beside the static run
    report = subprocess.run([sys.executable, "-m", "pipeline.report", "--runs-dir", str(runs_dir),
                             "--out", str(tmp_path / "table.md"), "--plot", str(tmp_path / "plot.png")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "plot.png").stat().st_size > 1000
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| t06", "| usw", "| static"]
    static = lines[-1].split(" | ")
    assert static[4] == "1.000" and static[6] == static[7] == "-" and static[8] == "0 + 1"  # no routers, no warm-up
    routed = lines[2].split(" | ")
    assert routed[6].endswith(" %") and routed[7][0] in "+-"  # decisions near a tie, soft - hard top-1
    assert float(lines[2].split(" | ")[-1].rstrip(" |")) > 0  # minutes, shared warm-up included


def test_a_failing_row_fails_alone_and_the_sweep_says_so(tmp_path):
    jobs = write_rows(tmp_path)
    broken = tmp_path / "nodata.yaml"  # finds no CIFAR-100 under data.root and may not generate one
    broken.write_text(f"extends: {jobs[2]}\njob: sweep_nodata\nmodel: {{num_classes: 100}}\n"
                      f"data: {{dataset: cifar100, generate: false}}\n")
    runs_dir = tmp_path / "runs"
    done = sweep(runs_dir, [jobs[2], broken], tmp_path / "data-nodata-only")
    assert done.returncode == 1, done.stdout + done.stderr
    record = json.loads((runs_dir / "sweep.json").read_text())["runs"]
    assert record["nodata"]["status"] == "failed" and record["static"]["status"] == "done"
    assert "failed nodata" in done.stdout and "does not exist" not in done.stdout
    assert "error:" in (runs_dir / "logs" / "nodata.log").read_text()  # the reason is in the row's log


def test_sigterm_reaches_every_row_which_checkpoints_and_stops(tmp_path):
    jobs = write_rows(tmp_path)
    runs_dir = tmp_path / "runs"
    longer = ["data.root=" + str(tmp_path / "data"), *TINY, "data.generated_size=48", "train.checkpoint_every=0"]
    sets = [arg for item in longer for arg in ("--set", item)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.sweep", "--runs-dir", str(runs_dir),
                             *map(str, jobs), *sets], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    logs = [runs_dir / "logs" / f"{name}.log" for name in ("static", "warmup-t06")]
    deadline = time.time() + 300
    while not all(log.is_file() and "steps/epoch" in log.read_text() for log in logs):
        assert proc.poll() is None and time.time() < deadline, "the runs never started training"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    record = json.loads((runs_dir / "sweep.json").read_text())["runs"]
    assert record["static"]["status"] == record["warmup-t06"]["status"] == "stopped", record
    assert record["t06"]["status"] == "pending"  # its warm-up never finished: it never started
    for run in ("static", "warmup-t06"):
        stage = "joint" if run == "static" else "warmup"
        assert sorted((runs_dir / run / stage / "checkpoints").glob("step-*")), f"{run} left no checkpoint"
