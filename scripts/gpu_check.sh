#!/usr/bin/env bash
# Issue 4's GPU check, prepared for a session that is lent the device machine (one H200;
# nothing can be installed there; its python3 holds torch with CUDA, transformers, peft,
# safetensors, tokenizers, pytest and hypothesis). No session has had a GPU yet, so this
# script has only run here with GPU_CHECK_DEVICE=cpu and a tiny shape (see below).
#
#   device run, command: bash scripts/gpu_check.sh      timeout_s: about 420
#   results come back under $OUT/gpu-check: nvidia-smi.txt, tests.txt, replay.txt, replay.json
#
# 1. the model's correctness tests (tests/model/test_forward.py and test_llm.py: logits of
#    mixed-adapter batches against transformers + peft, I4 through device hits, swaps and
#    recomputes, bf16) with the model runner and the engine on CUDA; the references stay on
#    the CPU (FASTLIBRA_TEST_DEVICE, tests/model/tinymodels.py)
# 2. `fastlibra bench replay` on a 7B-shaped random Llama (32 layers, hidden 4096, 32 heads,
#    intermediate 11008, vocab 32000; bf16) with 32 LoRAs of ranks 64 and 16, every policy at
#    the same device budget (the adapters + 4 contexts of 256 tokens), TTFT per policy
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPE="--hidden 64 ..." runs the same steps on a CPU.
set -uo pipefail
device="${GPU_CHECK_DEVICE:-cuda}"
shape="${GPU_CHECK_SHAPE:---hidden 4096 --layers 32 --heads 32 --kv-heads 32 --intermediate 11008 --vocab 32000 --adapters 32 --rank-hi 64 --rank-lo 16}"
duration="${GPU_CHECK_DURATION:-30}"
out="${OUT:-out}/gpu-check"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
status=0

{ nvidia-smi || true; "$py" -c "import torch; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name())"; } 2>&1 | tee "$out/nvidia-smi.txt"

echo "== correctness tests on $device =="
FASTLIBRA_TEST_DEVICE="$device" timeout 180 "$py" -m pytest -q -p no:cacheprovider \
    tests/model/test_forward.py tests/model/test_llm.py 2>&1 | tee "$out/tests.txt" || status=1

echo "== bench replay on $device (bf16) =="
# shellcheck disable=SC2086  # $shape is a list of flags
timeout 300 "$py" -m fastlibra.cli bench replay --device "$device" --dtype bfloat16 $shape \
    --duration "$duration" --threads 8 --json "$out/replay.json" 2>&1 \
    | tee "$out/replay.txt" || status=1
exit $status
