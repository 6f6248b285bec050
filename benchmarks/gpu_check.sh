#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one run of about 10 minutes on one GPU (a lent device machine):
#   bf16 step time, samples/s and peak memory against the floor compiled the same way (step_time.py --compile
#   blocks: SD1.5 at 512 px batch 8, SDXL at 1024 px, Flux.1's architecture at full width with 1 + 1 blocks at
#   1024 px), FLOPs, MFU and compile time (flops.py: SD1.5 eager and compiled, SDXL at batch 1 and 8, Flux), the
#   measured peak beside benchmarks/memory.py's estimate for the same Flux configuration, and the FSDP path on
#   CUDA/NCCL (whole-transformer DreamBooth on a tiny Flux through the shipped accelerate config; one GPU shards
#   nothing, so this checks the gathering and saving, not the sharding, which tests/e2e/test_fsdp.py checks on CPUs).
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh [OUT_DIR]     (from the repository root; OUT_DIR default $OUT or gpu-figures)
#
# Needs torch with CUDA and this project's dependencies importable; the device machine's image lacks diffusers
# and datasets, which travel as wheels (/work/.library/device/README.md), and torchao for memory.py (flux_lora.yaml
# quantizes). With torch 2.11 on an H200, cuDNN attention failed in Flux's backward pass
# (benchmarks/RESULTS.md, "One NVIDIA H200"); train.attention: auto leaves it out there
# (finetune/training/attention.py), and the benchmarks' bare loops use the same kernels. Not here yet: Flux.1-dev at its released size and SD3.5 Medium (a 24 GB random-weight
# folder takes longer to write than this run has). Figures go to OUT_DIR as JSON and logs; each step has its own
# time limit, and a failed step does not stop the others. PEAK_TFLOPS: the GPU's dense bf16 peak for MFU (default 989, H100/H200 SXM; what matrix products reach in practice is nearer 790).
set -u
OUT_DIR=${1:-${OUT:-gpu-figures}}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
PEAK=${PEAK_TFLOPS:-989}
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, say how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc" >>"$OUT_DIR/$name.log"
  tail -n 8 "$OUT_DIR/$name.log"
}

step env 60 "$PY" -m finetune env
# issue 35's figures, most wanted first (each step has its own limit, so a slow one cannot take the rest down):
# MFU of the bare model, eager against train.compile: blocks; then finetune against its floor, both compiled
step flops_sd15_b8_blocks 150 "$PY" benchmarks/flops.py --model sd15 --batch-size 8 --compile blocks \
  --peak-tflops "$PEAK" --json "$OUT_DIR/flops_sd15_b8_blocks.json"
step flops_sd15_b8_off 90 "$PY" benchmarks/flops.py --model sd15 --batch-size 8 --compile off \
  --peak-tflops "$PEAK" --json "$OUT_DIR/flops_sd15_b8_off.json"
step flops_sdxl_b1_blocks 240 "$PY" benchmarks/flops.py --model sdxl --resolution 1024 --batch-size 1 --compile blocks \
  --peak-tflops "$PEAK" --json "$OUT_DIR/flops_sdxl_b1_blocks.json"
step flops_sdxl_b8_blocks 120 "$PY" benchmarks/flops.py --model sdxl --resolution 1024 --batch-size 8 --compile blocks \
  --peak-tflops "$PEAK" --json "$OUT_DIR/flops_sdxl_b8_blocks.json"
step flops_flux_b2_blocks 150 "$PY" benchmarks/flops.py --model flux --resolution 1024 --batch-size 2 --compile blocks \
  --peak-tflops "$PEAK" --json "$OUT_DIR/flops_flux_b2_blocks.json"
step step_sdxl_b1_blocks 180 "$PY" benchmarks/step_time.py --model sdxl --resolution 1024 --steps 10 --compile blocks \
  --json "$OUT_DIR/step_sdxl_b1_blocks.json"
step step_sd15_b8_blocks 150 "$PY" benchmarks/step_time.py --model sd15 --batch-size 8 --steps 10 --compile blocks \
  --json "$OUT_DIR/step_sd15_b8_blocks.json"
step step_flux_blocks 150 "$PY" benchmarks/step_time.py --model flux --resolution 1024 --steps 10 --compile blocks \
  --json "$OUT_DIR/step_flux_blocks.json"
step memory_estimate 90 "$PY" benchmarks/memory.py --json "$OUT_DIR/memory.json"
# issue 36: train.offload's memory saved and time added: Flux at full width (1 + 1 blocks), one block streamed
step step_flux_checkpointed 150 "$PY" benchmarks/step_time.py --model flux --resolution 1024 --steps 10 \
  --recipe benchmarks/configs/offload/checkpointed.yaml --json "$OUT_DIR/step_flux_checkpointed.json"
step step_flux_offload 150 "$PY" benchmarks/step_time.py --model flux --resolution 1024 --steps 10 \
  --recipe benchmarks/configs/offload/streamed.yaml --json "$OUT_DIR/step_flux_offload.json"

# FSDP through the shipped accelerate config and recipe, on every GPU there is, on a tiny Flux
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
step tiny_flux 60 "$PY" -m finetune.models.tiny "$OUT_DIR/tiny-flux" --family flux
step fsdp 180 "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp_flux.yaml \
  --num_processes "${GPUS:-1}" -m finetune train recipes/flux_dreambooth_fsdp.yaml \
  model.base="$OUT_DIR/tiny-flux" data.images=data_examples/star data.resolution=64 train.max_steps=4 \
  checkpoint.every=2 prior.mode=none log.to=[] output_dir="$OUT_DIR/fsdp-run"
grep -h "engine:\|sharding:\|nothing is sharded" "$OUT_DIR/fsdp.log" || echo "fsdp: no engine line (see fsdp.log)"
rm -rf "$OUT_DIR/tiny-flux" "$OUT_DIR/fsdp-run"  # what comes back from a device machine is limited in size
