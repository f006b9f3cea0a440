"""The speed benchmark runs end to end at tiny sizes on the CPU (its figures matter on a GPU only)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_tiny_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.model_bench", "--tiny", "--device", "cpu", "--archs",
                           "resnet110", "--skip-buckets", "1", "8", "32", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    train = result["train"]["resnet110"]
    assert train["static_synthetic"] > 0 and train["rdinet_synthetic"] > 0 and train["rdinet_dali"] > 0
    rows = result["inference"]["resnet110"]["batch8"]
    assert {"static", "skip@0.3", "skip8@0.3", "skip32@0.3", "masked@0.3"} <= set(rows)
    # random decisions at rate 0.3 cost about 0.3 of the blocks (plus stem, head, shortcut projections)
    assert 0.1 < rows["skip@0.3"]["ratio"] < 0.6 and rows["static"]["ratio"] == 1.0
    assert result["srm"]["resnet110"]["ms_per_batch"] > 0
    assert "infer resnet110 batch8" in proc.stdout


def test_cuda_graph_training_rows_need_a_gpu(capsys):
    from benchmarks.model_bench import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--cuda-graph", "--tiny"])
    assert exit_info.value.code == 2 and "needs a CUDA --device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_rows_with_each_step_one_cuda_graph(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.model_bench", "--tiny", "--device", "cuda", "--archs",
                           "resnet110", "--skip-inference", "--cuda-graph", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads(out.read_text())["train"]["resnet110"]
    assert train["cuda_graph"] and train["static_synthetic"] > 0 and train["rdinet_synthetic"] > 0
    assert train["rdinet_dali"] > 0 and train["rdinet_gpu_ms_per_step"] > 0
    assert "each step one CUDA graph" in proc.stdout


@pytest.mark.slow  # every row of the trainer's step, DeepSpeed included: ~35 s on 2 cores
def test_trainer_step_bench_times_every_row_of_the_trainers_step(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trainer_step", "--tiny", "--compile", "none", "--steps", "2",
                           "--rounds", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.split()}
    names = ("module", "engine", "flags", "flags2", "loader", "logged")
    for row in names:
        ms, img_s = float(rows[row][0]), float(rows[row][1])
        assert ms > 0 and abs(img_s - 8 / ms * 1000) <= 1, (row, rows[row])  # batch 8 in --tiny
    assert all(float(rows[row][2]) > 0 for row in names)  # host ms a step
    assert all(rows[row][3:6] == ["-", "-", "-"] for row in names)  # GPU only
    eager = {row: float(rows[row][6]) for row in names}  # aten ops outside graphs
    # uncompiled, every op is eager: the engine adds its loss scaling, the flags their stack and
    # copies, the logging (every 2 steps in --tiny) its reductions and copies to the host
    assert 0 < eager["module"] < eager["engine"] < eager["flags"] <= eager["loader"] < eager["logged"], eager
    assert "graphs torch.compile kept out of CUDA graphs: 0" in proc.stdout


def test_trainer_step_bench_takes_reduce_overhead_with_a_job_that_captures_its_step(tmp_path):
    # jobs/cifar10_r110.yaml sets train.cuda_graph, which the config refuses with reduce-overhead;
    # the benchmark's rows build their own steps, so it turns the key off
    from benchmarks import trainer_step
    cfg = trainer_step.job_config(trainer_step.parse_args(["--compile", "reduce-overhead"]), tmp_path)
    assert cfg["train"]["compile"] == "reduce-overhead" and cfg["train"]["cuda_graph"] is False


def test_short_gaps_count_only_the_idle_time_between_nearby_gpu_operations():
    from benchmarks.timing import short_gaps_us
    # two overlapping kernels (0-15 busy), a 2 us gap, a kernel, then an 80 us wait for the host
    spans = [(5.0, 15.0), (0.0, 10.0), (17.0, 20.0), (100.0, 110.0)]
    assert short_gaps_us(spans) == 2.0
    assert short_gaps_us(spans, below_us=100.0) == 82.0  # both gaps, counted directly: 17-15 + 100-20
    assert short_gaps_us([(0.0, 30.0), (1.0, 2.0), (31.0, 40.0)]) == 1.0  # a kernel inside another's span
    assert short_gaps_us([]) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fed_timeline_reports_every_feed():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fed_timeline", "--tiny", "--steps", "2", "--cuda-graph"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()}
    for feed in ("synthetic", "dali_mixed", "dali_cpu"):
        assert "ms/step" in rows[feed] and "other streams" in rows[feed]
    assert "dali_cpu" in rows["img/s:"]



def test_timer_calls_warmup_then_windows_and_returns_the_median_window():
    from benchmarks.timing import Timer
    for clock in ("wall", "host"):
        sleeps = iter([0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.0])  # warm-up, window 1 (slow), windows 2 and 3
        calls = []

        def fn():
            calls.append(1)
            time.sleep(next(sleeps))
        seconds = Timer(torch.device("cpu"), warmup=1, iters=2, repeats=3, clock=clock)(fn)
        assert len(calls) == 1 + 2 * 3 and seconds < 0.01  # the slow window is not the median
    with pytest.raises(ValueError, match="events on a GPU only"):
        Timer(torch.device("cpu"), warmup=0, iters=1, repeats=1, clock="events")

