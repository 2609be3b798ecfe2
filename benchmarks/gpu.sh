#!/usr/bin/env bash
# The GPU check of issue 17, prepared to run as one command whenever a GPU is lent (about 5 minutes on an H200):
#
#   bash benchmarks/gpu.sh [OUT.md]
#
# FHBench's OrganAMNIST config (configs/organamnist_fedavg.yaml: ViT-B/16 at 224 px, LoRA r=8, 20 clients) on fixture
# data from fedhb's own writer, 3 rounds: bf16-mixed sequential and with --federation.client_batch 8, 16-mixed with
# SCAFFOLD and APPLE (gradients through the loss scaler), and the page-locked, non-blocking client-state swaps.
# Prints the table (benchmarks/gpu.py describes every column) and writes it to OUT.md (default
# benchmarks/gpu_results.md) with a .json of every figure beside it. Needs no network: the ViT is random-init.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
OUT="${1:-benchmarks/gpu_results.md}"
WORK="${FEDHB_GPU_WORK:-/tmp/fedhb_gpu}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.cuda.get_device_name())"
# 8 minutes at most: a cell that hangs must not take the machine's whole lease.
timeout 480 "$PYTHON" benchmarks/gpu.py --device cuda --rounds 3 --work "$WORK" --out "$OUT"
