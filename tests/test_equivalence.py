"""`python -m benchmarks.equivalence` on the CPU: the demo job made tiny, on 1 and 2 real processes (gloo)
at one global batch. Both runs train every image once per epoch and report a loss curve per stage."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # 3 training runs of 1 and 2 processes: ~1 min on 2 cores

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.generated_size=12", "data.generated_val_size=4", "stages.warmup.epochs=1", "stages.joint.epochs=1",
        "stages.joint.milestones=[]", "optim.warmup_epochs=1", "train.log_every=1", "model.d=32"]


def test_one_and_two_processes_at_one_global_batch(tmp_path):
    sets = [arg for pair in [*TINY, f"data.root={tmp_path / 'data'}"] for arg in ("--set", pair)]
    done = subprocess.run([sys.executable, "-m", "benchmarks.equivalence", "--processes", "1", "2", "--noise-seed", "-1",
                           "--global-batch", "16", "--work", str(tmp_path / "runs"), *sets],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1].removeprefix("RESULT "))
    assert list(result["runs"]) == ["n1-seed0", "n2-seed0"] and result["global_batch"] == 16
    for stage in ("warmup", "joint"):
        one, two = (result["runs"][name][stage] for name in ("n1-seed0", "n2-seed0"))
        assert one["images_per_epoch"] == two["images_per_epoch"] == [112]  # 120 images, 7 steps of 16
        assert len(one["loss_curve"]) == len(two["loss_curve"]) == 7  # every step logged: 7 parts of one step
        assert all(math.isfinite(v) for v in one["loss_curve"] + two["loss_curve"])
        assert two["largest_loss_gap_vs_n1-seed0"] >= 0 and "top1" in two["metrics"]
        # the lr warm-up ramps over the stage's 7 steps on either process count
        assert len(one["lr_curve"]) == 7 and one["lr_curve"] == two["lr_curve"], (one["lr_curve"], two["lr_curve"])
        assert two["largest_lr_gap_vs_n1-seed0"] == 0
    # the 2-process run really had two ranks: each read half of every global batch
    config = (tmp_path / "runs" / "n2-seed0" / "config.yaml").read_text()
    assert "batch_size: 8" in config
