"""`python -m pipeline.data.bench` at tiny sizes on the CPU: it runs and reports all three figures."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dataset, extra", [
    ("imagenet", ["--image-size", "32", "--image-px", "48"]),
    ("cifar10", []),
])
def test_bench_on_cpu(tmp_path, dataset, extra):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.data.bench", "--dataset", dataset, "--device", "cpu", "--batch-size", "4",
         "--steps", "2", "--warmup", "0", "--image-count", "20", "--num-threads", "2", "--rounds", "3", "--root", str(tmp_path),
         *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("loader only:") for line in lines)
    figures = json.loads(lines[-1].removeprefix("RESULT "))
    rounds = figures.pop("rounds")
    assert set(figures) == {"loader_img_s", "train_loader_img_s", "train_synthetic_img_s", "loader_fed_fraction"}
    assert all(value > 0 for value in figures.values())
    assert len(rounds) == 3 and all(r["fraction"] == pytest.approx(r["fed"] / r["synthetic"]) for r in rounds)
    assert figures["loader_fed_fraction"] == pytest.approx(statistics.median(r["fraction"] for r in rounds))
    assert figures["train_loader_img_s"] == pytest.approx(statistics.median(r["fed"] for r in rounds))
