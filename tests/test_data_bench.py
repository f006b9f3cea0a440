"""`python -m benchmarks.loader_bench` at tiny sizes on the CPU: it runs and reports all three figures; on a GPU
also with the whole step captured as one CUDA graph."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, *args) -> tuple[list[str], dict]:
    """Runs the benchmark in a fresh process: its output lines and its RESULT figures."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.loader_bench", "--root", str(tmp_path), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    return lines, json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow  # a benchmark process per dataset: 3-5 s each
@pytest.mark.parametrize("dataset, extra", [
    ("imagenet", ["--image-size", "32", "--image-px", "48"]),
    ("cifar10", []),
])
def test_bench_on_cpu(tmp_path, dataset, extra):
    lines, figures = run_bench(tmp_path, "--dataset", dataset, "--device", "cpu", "--batch-size", "4", "--steps", "2",
                               "--warmup", "0", "--image-count", "20", "--num-threads", "2", "--rounds", "3", *extra)
    assert any(line.startswith("loader only:") for line in lines)
    rounds = figures.pop("rounds")
    assert set(figures) == {"loader_img_s", "train_loader_img_s", "train_synthetic_img_s", "loader_fed_fraction"}
    assert all(value > 0 for value in figures.values())
    assert len(rounds) == 3 and all(r["fraction"] == pytest.approx(r["fed"] / r["synthetic"]) for r in rounds)
    assert figures["loader_fed_fraction"] == pytest.approx(statistics.median(r["fraction"] for r in rounds))
    assert figures["train_loader_img_s"] == pytest.approx(statistics.median(r["fed"] for r in rounds))


def test_cuda_graph_needs_a_gpu_and_no_graphs_of_its_own(capsys):
    from benchmarks import loader_bench as bench
    for argv, message in ((["--device", "cpu", "--cuda-graph"], "needs --device cuda"),
                          (["--device", "cuda", "--cuda-graph", "--compile", "reduce-overhead"], "use --compile default or none")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.slow  # a benchmark process per dataset: 3-5 s each
@pytest.mark.parametrize("dataset, extra", [
    ("imagenet", ["--image-size", "64", "--image-px", "96"]),
    ("cifar10", []),
])
def test_bench_with_the_step_as_one_cuda_graph(tmp_path, dataset, extra):
    lines, figures = run_bench(tmp_path, "--dataset", dataset, "--device", "cuda", "--batch-size", "16", "--steps", "4",
                               "--warmup", "1", "--image-count", "80", "--rounds", "2", "--cuda-graph", *extra)
    assert any("the step as one CUDA graph" in line for line in lines)
    assert figures["train_loader_img_s"] > 0 and figures["train_synthetic_img_s"] > 0
