#!/usr/bin/env bash
# The GPU check (issue 16), prepared for a session lent a device machine: one H100/H200,
# no network, python3 with torch (2.11), triton (3.6) and transformers (5.17); pytest, peft
# and hypothesis are used when present. Under 8 minutes in all; every step has a timeout
# and the script goes on after a failed step (its exit status says one failed). Nothing
# large is written: the 8B-shaped model is initialised on the GPU.
#
#   device run, command: bash scripts/gpu_check.sh      timeout_s: 520
#   results come back under $OUT/gpu-check: facts.txt, tests.txt, pool.txt, kernels.txt,
#   kernels.json
#
# 1. correctness on CUDA, compiled kernels: the kernel tests against their torch
#    references (tests/model/test_*_kernel.py), the forward pass through the kernels
#    against the torch path and peft (test_kernel_forward.py), and the model's tests
#    (test_forward.py, test_llm.py: transformers + peft references on the CPU)
# 2. the device pool sized by profiling (LLM without --device-memory on a tiny model)
# 3. `fastlibra bench kernels`: decode step ms at batch 1/16/64, base model and 50
#    distinct rank-16 adapters on every linear layer, torch path vs kernels, on a random
#    Llama-3-8B shape in bf16; the logits of both paths on a mixed step; host syncs
#    inside one kernel-path step. Its table is printed last.
set -euo pipefail
out="${OUT:-out}/gpu-check"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASTLIBRA_TEST_DEVICE=cuda
unset TRITON_INTERPRET FASTLIBRA_KERNELS
py="${PYTHON:-python3}"
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; } 2>&1 \
    | tee "$out/facts.txt" || status=1

echo "== 1. correctness on CUDA =="
if "$py" -c "import pytest, peft, hypothesis" 2>/dev/null; then
    timeout 200 "$py" -m pytest -q -x -p no:cacheprovider -m "" \
        tests/model/test_attention_kernel.py tests/model/test_lora_kernel.py \
        tests/model/test_kernel_forward.py tests/model/test_forward.py tests/model/test_llm.py \
        2>&1 | tee "$out/tests.txt" || status=1
else
    echo "pytest, peft or hypothesis missing: tests skipped (bench kernels still compares" \
         "both paths)" | tee "$out/tests.txt"
fi

echo "== 2. device pool from profiling =="
timeout 60 "$py" - <<'EOF' 2>&1 | tee "$out/pool.txt" || status=1
import tempfile
from pathlib import Path

import torch

from fastlibra.llm import LLM
from fastlibra.model.tiny import build_tiny_model

with tempfile.TemporaryDirectory() as tmp:
    base, adapters = build_tiny_model(Path(tmp), num_adapters=2)
    free, total = torch.cuda.mem_get_info()
    # a utilization that leaves about 1 GiB for the pool (a tiny model's blocks are tiny:
    # a 40 GiB pool would be millions of blocks for the cache's books)
    util = (total - free + 2**30) / total
    llm = LLM(base, adapters, device="cuda", gpu_memory_utilization=util,
              host_memory=64 * 2**20)
    pool = llm.runner.kv.data.nbytes
    print(f"pool {pool / 2**30:.3f} GiB at utilization {util:.4f} of {total / 2**30:.1f} GiB "
          f"({(total - free) / 2**30:.2f} GiB in use before: expect a little under 1 GiB, "
          f"less the profiled peak); max_model_len {llm.max_model_len}")
    (o,) = llm.generate("w7 w8 w9", adapter="lora-0")
    print("generated", o.token_ids)
    llm.close()
EOF

echo "== 3. bench kernels (Llama-3-8B shape, bf16) =="
timeout 180 "$py" -m fastlibra.cli bench kernels --json "$out/kernels.json" 2>&1 \
    | tee "$out/kernels.txt" || status=1
exit $status
