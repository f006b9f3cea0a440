"""pipeline.sweep on the CPU: rows run side by side, one shared warm-up, a stopped sweep resumes."""
import json
import subprocess
import sys
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
    report = subprocess.run([sys.executable, "-m", "pipeline.report", "--runs-dir", str(runs_dir),
                             "--out", str(tmp_path / "table.md"), "--plot", str(tmp_path / "plot.png")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "plot.png").stat().st_size > 1000
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| t06", "| usw", "| static"]
    static = lines[-1].split(" | ")
    assert static[4] == "1.000" and static[6] == "0 + 1"  # the static network, no warm-up
    assert float(lines[2].split(" | ")[-1].rstrip(" |")) > 0  # minutes, shared warm-up included
