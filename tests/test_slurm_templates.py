"""The slurm/ templates without a cluster: what each says a user edits, and slurm/preflight.py, the
submit-time check (job file, data root, run directory) that also lists the stages still to run."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ["imagenet_r101", "imagenet_r50", "cifar10_r110", "cifar100_r110"]


def load_preflight():
    spec = importlib.util.spec_from_file_location("slurm_preflight", REPO / "slurm" / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_declares_what_a_user_edits_and_shares_the_launcher(name):
    path = REPO / "slurm" / f"{name}.sh"
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    for option in ("nodes", "gpus-per-node", "time", "partition", "output", "signal", "requeue"):
        assert option in sbatch, f"{name}: no #SBATCH --{option}"
    assert re.search(r"^##SBATCH --account=", text, re.M), f"{name}: no account line to enable"
    assert sbatch["signal"].startswith("B:USR1@")  # to the batch shell, which forwards the stop
    variables = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", text, re.M))
    assert {"JOB", "DATA_ROOT", "RUN_DIR", "VENV"} <= set(variables), variables
    assert (REPO / variables["JOB"]).is_file(), f"{name}: job {variables['JOB']} does not exist"
    assert text.rstrip().endswith('source "$REPO/slurm/launch.sh"')  # one launcher, not copies
    assert "/work/" not in text and "/home/" not in text


def test_multi_node_template_asks_for_several_nodes():
    text = (REPO / "slurm" / "imagenet_r101.sh").read_text()
    assert int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1)) >= 2


def test_launcher_expands_the_node_rank_per_task():
    # `srun accelerate launch --machine_rank $SLURM_NODEID` would expand in the batch shell: every
    # node would get rank 0. The launch command must be single-quoted, expanded by each task.
    text = (REPO / "slurm" / "launch.sh").read_text()
    srun = text[text.index("srun --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks=\"$SLURM_JOB_NUM_NODES\" --ntasks-per-node=1 \"${cpus"):]
    assert re.search(r"bash -c 'exec [^']*--machine_rank \"\$SLURM_NODEID\"[^']*'", srun)
    assert "--kill-on-bad-exit=1" in srun and "--wait=" in srun


def test_launcher_requeues_on_the_trainers_mark():
    # The nodes launch through pipeline.launch (the workers' exit code, one closing line), and a
    # stage is requeued on the mark pipeline/train.py leaves, under its name, removed before srun.
    from pipeline.rundir import REQUEUE_MARK
    text = (REPO / "slurm" / "launch.sh").read_text()
    assert f"REQUEUE_MARK={REQUEUE_MARK} " in text
    srun_at = text.index('srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" '
                         '--ntasks-per-node=1 "${cpus')
    assert 0 < text.index('rm -f "$RUN_DIR/$REQUEUE_MARK"') < srun_at
    assert re.search(r"bash -c 'exec \"\$0\" -m pipeline\.launch ", text[srun_at:])
    assert '[ -f "$RUN_DIR/$REQUEUE_MARK" ]' in text


def manifest(run_dir: Path, stage: str) -> None:
    final = run_dir / stage / "final"
    final.mkdir(parents=True)
    (final / "manifest.json").write_text(json.dumps({"stage": stage}))


def test_preflight_lists_pending_stages(tmp_path, capsys):
    preflight = load_preflight()
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    args = ["--job", str(REPO / "jobs/demo.yaml"), "--run-dir", str(run), "--set", f"data.root={data}"]
    expected = [("", "warmup joint"), ("warmup", "joint"), ("joint", "")]
    for completed, pending in expected:
        if completed:
            manifest(run, completed)
        assert preflight.main(args) == 0
        assert capsys.readouterr().out.strip() == pending
    assert (run / "logs").is_dir()  # created, and proven writable
    # A job without a warm-up stage has only the joint stage to run.
    assert preflight.main(args[:2] + ["--run-dir", str(tmp_path / "r2"), "--set", f"data.root={data}",
                                      "--set", "stages.warmup.epochs=0"]) == 0
    assert capsys.readouterr().out.strip() == "joint"


def test_preflight_refuses_bad_input_naming_the_fix(tmp_path, capsys):
    preflight = load_preflight()
    data = tmp_path / "data"
    data.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    other_job = tmp_path / "other"
    other_job.mkdir()
    (other_job / "config.yaml").write_text("job: imagenet_r50\n")
    demo = ["--job", str(REPO / "jobs/demo.yaml")]
    cases = [
        (["--run-dir", str(a_file / "run"), "--set", f"data.root={data}"],
         f"cannot create run directory {a_file / 'run'}", "set RUN_DIR"),
        (["--run-dir", str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'nope'}"],
         f"data root {tmp_path / 'nope'} does not exist", "set DATA_ROOT"),
        (["--run-dir", str(tmp_path / "run"), "--set", f"data.root={data}", "--set", "optim.lrr=1"],
         "unknown config key 'optim.lrr'", "known keys here"),
        (["--run-dir", str(other_job), "--set", f"data.root={data}"],
         "belongs to job 'imagenet_r50', not 'demo'", "set RUN_DIR"),
        (["--run-dir", str(tmp_path / "run"), "--set", f"data.root={data}", "--stage", "joint"],
         "EXTRA_ARGS may only hold --set", "sets --job, --stage and --run-dir itself"),
    ]
    for args, problem, fix in cases:
        assert preflight.main(demo + args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and fix in err, err
    # A job whose data.root is unset (the real datasets) is refused with the key to set.
    assert preflight.main(["--job", str(REPO / "jobs/cifar10_r110.yaml"), "--run-dir", str(tmp_path / "c")]) == 2
    assert "data.root" in capsys.readouterr().err


def test_preflight_command_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "slurm" / "preflight.py"), "--job", "jobs/demo.yaml",
                           "--run-dir", str(tmp_path / "run"), "--set", f"data.root={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "warmup joint\n", "")
