#!/usr/bin/env bash
# One run on a GPU machine (the `device` tool): kernel tests on CUDA, kernel benchmarks, the engine
# against transformers on random-weight models, and `shardlm bench throughput`. Each step has its
# own time limit and writes to $OUT as it goes, so a step that hangs costs only itself.
#   run from the project root with .whl/ carried (../shared/device/pack-ray.sh, plus pytest wheels)
set -u
OUT=${OUT:-/tmp/shardlm-gpu-out}
mkdir -p "$OUT"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$OUT/steps.txt"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && tar xJf .whl/ray-py312.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled TQDM_DISABLE=1 TRANSFORMERS_VERBOSITY=error
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_capability())" >> "$OUT/gpu.txt" 2>&1
step kernel_tests "${KERNEL_TESTS_S:-150}" python3 -m pytest tests/kernels -q -p no:cacheprovider -o addopts="" --durations=10
step kernel_bench "${KERNEL_BENCH_S:-90}" python3 -m kernels.bench --out "$OUT"
step engine_check "${ENGINE_CHECK_S:-200}" python3 tests/gpu/engine_check.py "$OUT"
step fast_steps "${FAST_STEPS_S:-200}" python3 tests/gpu/fast_steps_check.py "$OUT"
step throughput_bf16 "${THROUGHPUT_S:-90}" python3 -m driver bench throughput --model /tmp/shardlm-gpu-check/model \
  --dtype bfloat16 --skip-tokenizer-init --num-prompts 256 --input-len 64 --input-len-max 256 --output-len 128 --json --quiet
step throughput_fp8 "${THROUGHPUT_S:-90}" python3 -m driver bench throughput --model /tmp/shardlm-gpu-check/model \
  --dtype bfloat16 --skip-tokenizer-init --quantization fp8 --num-prompts 256 --input-len 64 --input-len-max 256 --output-len 128 --json --quiet
step load_tests "${LOAD_TESTS_S:-90}" python3 -m pytest tests/workers/test_load_pipeline.py tests/workers/test_gguf_dequant.py -q -p no:cacheprovider -o addopts=""
step load_model "${LOAD_MODEL_S:-60}" python3 tests/gpu/make_load_model.py /tmp/shardlm-gpu-check/llama-1b
step latency_1b "${LATENCY_S:-150}" env SHARDLM_CUDA_GRAPHS=1 SHARDLM_STEP_DISPATCH=shm python3 -m driver bench latency \
  --model /tmp/shardlm-gpu-check/llama-1b --load-format dummy --dtype bfloat16 --skip-tokenizer-init --batch-sizes 1,256 --json --quiet
step bench_load "${BENCH_LOAD_S:-120}" python3 -m driver bench load --model /tmp/shardlm-gpu-check/llama-1b --dtype bfloat16 --repeat 2 --json
cat "$OUT/steps.txt"
