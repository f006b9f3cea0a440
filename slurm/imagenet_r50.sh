#!/bin/bash
# RDI-Net-50 on ImageNet (jobs/imagenet_r50.yaml): 1 node x 8 GPUs, batch 32 per GPU.
# Submit from the repository root:   sbatch slurm/imagenet_r50.sh      (checks run inside the job)
#                                or   bash slurm/imagenet_r50.sh        (checks now, then submits)
# Both run the warm-up and the joint stage as two chained jobs and skip completed stages; sbatch
# options after the script name override the #SBATCH lines below (e.g. --nodes=2 --time=2:00:00).
# A job stopped by its time limit or by preemption checkpoints, requeues itself and resumes.
# Edit these for your cluster:
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=48
#SBATCH --time=2-00:00:00
#SBATCH --partition=gpu
##SBATCH --account=YOUR_ACCOUNT
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@180
#SBATCH --requeue

# What to train, where (paths relative to the repository root or absolute; environment wins):
JOB=${JOB:-jobs/imagenet_r50.yaml}
DATA_ROOT=${DATA_ROOT:-data/imagenet}  # train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; must exist on every node
RUN_DIR=${RUN_DIR:-runs/imagenet_r50}
VENV=${VENV:-.venv}
EXTRA_ARGS=${EXTRA_ARGS:-}  # more train.py overrides, e.g. "--set optim.lr=0.2"
# Also read from the environment: LAUNCH_CONFIG, GPUS_PER_NODE, MASTER_PORT, STOP_GRACE, NODE_EXIT_WAIT,
# NCCL_* (see slurm/launch.sh).

# The repository: this file's parent folder, or inside a job the folder sbatch was run from.
REPO=${REPO:-$(cd "$(dirname "$0")/.." && [ -f slurm/launch.sh ] && pwd || echo "${SLURM_SUBMIT_DIR:-$PWD}")}
source "$REPO/slurm/launch.sh"
