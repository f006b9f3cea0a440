#!/usr/bin/env bash
# One pass over every GPU code path, with the figures the issues ask for. Run from the repo root
# on a CUDA machine with DALI and DeepSpeed importable; results go to ${OUT:-benchmarks/out}.
#   bash benchmarks/gpu_check.sh [tests|train|trainer|trainerstep|databench|bench|equivalence|all]...
set -uo pipefail
out=${OUT:-benchmarks/out}
scratch=${TMPDIR:-/tmp}  # run directories and generated data
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
what=${*:-all}
has() { [[ " $what " == *" $1 "* || " $what " == *" all "* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, nvidia.dali, deepspeed, accelerate; print('torch', torch.__version__, 'dali', nvidia.dali.__version__, 'deepspeed', deepspeed.__version__, 'accelerate', accelerate.__version__)" 2>/dev/null | tee -a "$out/gpu.txt"
if has tests; then
  timeout 360 python3 -m pytest -q -x tests/test_data_gpu.py tests/test_gpu_sync.py tests/test_graphed_step.py tests/test_trainer_step.py tests/test_rdinet_model.py tests/test_rdinet_srm.py tests/test_rdinet_inference.py 2>&1 | tail -15 | tee "$out/tests.txt"
fi
if has train; then
  rm -rf "$scratch/gpu-run"
  timeout 300 accelerate launch --config_file jobs/accelerate/single_gpu.yaml pipeline/train.py \
    --run-dir "$scratch/gpu-run/run" --set data.root="$scratch/gpu-run/data" --set train.progress=false \
    --set train.deterministic=false 2>&1 | grep -v -i warn | tail -25 | tee "$out/train.txt"
  timeout 120 python3 -m pipeline.evaluate --run-dir "$scratch/gpu-run/run" 2>&1 | tail -3 | tee -a "$out/train.txt"
fi
if has databench; then
  # eager, CUDA graphs of the forward and backward, and the whole step as one graph (as the CIFAR jobs train)
  for variant in "--compile none" "--compile reduce-overhead" "--cuda-graph"; do
    timeout 300 python3 -m benchmarks.loader_bench --dataset cifar10 --device cuda --image-count 50000 \
      --root "$scratch/databench-cifar" $variant 2>&1 | tail -6 | tee -a "$out/databench_cifar.txt"
  done
  # JPEGs decoded on the GPU, then on DALI's CPU threads with the whole step as one graph
  for variant in "--decode-device mixed" "--decode-device cpu --cuda-graph"; do
    timeout 300 python3 -m benchmarks.loader_bench --dataset imagenet --device cuda --root "$scratch/databench-imagenet" \
      $variant 2>&1 | tail -6 | tee -a "$out/databench_imagenet.txt"
  done
fi
if has bench; then
  timeout 400 python3 -m benchmarks.model_bench --device cuda --out "$out/bench.json" 2>&1 | grep -v -i warn | tail -20 | tee "$out/bench.txt"
fi
if has trainer; then
  # pipeline/train.py's own img/s: RDI-Net-110 (the CIFAR job: ZeRO-0, bf16), 45,000 generated
  # images, compiled with CUDA graphs and eager; the first epoch of each stage includes compiling.
  for mode in reduce-overhead none; do
    rm -rf "$scratch/gpu-trainer/run-$mode"
    timeout 420 python3 pipeline/train.py --job jobs/cifar10_r110.yaml --run-dir "$scratch/gpu-trainer/run-$mode" \
      --set data.root="$scratch/gpu-trainer/data" --set data.generate=true --set data.generated_size=4500 \
      --set data.generated_val_size=100 --set stages.warmup.epochs=1 --set stages.joint.epochs=2 \
      --set stages.joint.milestones=[] --set train.eval_every=5 --set train.progress=false \
      --set train.compile=$mode 2>&1 | grep -E "trained|rror" | sed "s/^/$mode: /" | tee -a "$out/trainer.txt"
  done
fi
if has trainerstep; then
  # the trainer's step row by row (compiled module, DeepSpeed engine, step flags, DALI), RDI-Net-110
  # joint and static; one compile per mode
  for mode in joint full; do
    timeout 420 python3 -m benchmarks.trainer_step --mode $mode 2>&1 | grep -v -i warn | tail -20 | tee -a "$out/trainer_step.txt"
  done
fi
gpus=$(nvidia-smi -L | wc -l)
if has equivalence && [ "$gpus" -gt 1 ]; then
  # the short real-CIFAR RDI-Net-32 job on 1 and on every GPU at global batch 256
  if [ -z "${CIFAR_ROOT:-}" ]; then
    echo "equivalence: set CIFAR_ROOT to the folder holding cifar-10-batches-py/" | tee "$out/equivalence.txt"
  else
    timeout 3000 python3 -m benchmarks.equivalence --job jobs/cifar10_r32_short.yaml --processes 1 "$gpus" \
      --accelerate-config jobs/accelerate/multi_gpu.yaml --work "$scratch/equivalence" \
      --set data.root="$CIFAR_ROOT" --out "$out/equivalence.json" 2>&1 | grep -v "^RESULT" | tee "$out/equivalence.txt"
  fi
fi
