#!/usr/bin/env bash
# The accelerator checks, in one go on a machine with an NVIDIA GPU and JAX with CUDA:
#   1. the GPU tests (tests/test_gpu.py: cuDNN attention chosen by 'auto', its numerics and a bf16
#      train step through it) and tests/test_attention.py,
#   2. ViT-B/16 at 224², bfloat16, batch 256: train and inference img/s and MFU next to timm's and
#      Hugging Face's ViT in PyTorch on the same GPU (bf16 autocast), eager and under torch.compile
#      (inductor, default mode; each compiled peer's first call, which compiles, is reported apart)
#      in one interleaved run (stage compiled; stage model: the eager peers only, faster),
#   3. the token sweep (224 -> 448 -> 896, plain / remat / fused / fused+remat): memory and step time,
#   4. ours alone with the plain softmax, and at batch 512, to show what each choice is worth,
#   5. (stage sweep, not in the default list) ours alone under a few XLA GPU flags and at batch 384.
# Each stage has its own time limit, so one that fails or hangs costs only itself.
#
#   scripts/gpu_check.sh OUT_DIR [STAGE ...]
#     writes log.txt, vit_b16.json, tokens.json, tokens.png into OUT_DIR; the stages default to
#     env tests compiled tokens explicit batch512 (others: model, gpu_tests, train, sweep);
#     TOKEN_VARIANTS=fused,... limits the token stage's variants. Their limits add up to more than
#     one 10-minute command: run `env compiled` in one call and `tests tokens explicit batch512` in
#     the next. BENCH_MODEL / BENCH_BATCH / BENCH_ARGS replace ViT-B_16 / 256 / '' in the model
#     stages (a dry run on a CPU: BENCH_MODEL=ViT-testing BENCH_BATCH=2
#     BENCH_ARGS='--image_size 16').
#
# It uses the machine's own python3 and packages (PYTHON to override); the project's pins apply to
# the CPU virtual environment only.
set -u
mkdir -p "${1:-runs/gpu_check}"
out=$(cd "${1:-runs/gpu_check}" && pwd)
log="$out/log.txt"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 TRANSFORMERS_VERBOSITY=error
cd "$(dirname "$0")/.."

stage() {  # stage NAME SECONDS COMMAND...: runs it under a limit, logs its output and exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) $(date +%T)" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$log"
}

run_env() {
  stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv; $py -c 'import jax, flax, optax, torch; print(\"jax\", jax.__version__, \"flax\",
    flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__, jax.devices())'"
}
# The tests' CPU shortcut (no LLVM optimisation) is off: the GPU is compiled as users' runs are.
run_tests() {
  stage tests 300 env VIT_JAX_TEST_OPTIMIZED=1 "$py" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_attention.py
}
run_gpu_tests() {
  stage gpu_tests 180 env VIT_JAX_TEST_OPTIMIZED=1 "$py" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py
}
bench_model=${BENCH_MODEL:-ViT-B_16}
bench_batch=${BENCH_BATCH:-256}
read -r -a bench_args <<< "${BENCH_ARGS:-}"
run_model() {  # train and inference, next to timm and Hugging Face (eager)
  stage model 200 "$py" scripts/benchmark.py model --model "$bench_model" --batch "$bench_batch" \
    ${bench_args[@]+"${bench_args[@]}"} --dtype bfloat16 --compare timm,hf --repeats 3 --seconds 3 \
    --json_out "$out/vit_b16.json"
}
# The same, with timm's and Hugging Face's models under torch.compile too: the ratio against the
# fastest of the four PyTorch variants. Compiling the two peers' train and inference graphs takes
# minutes on its own, outside the timed windows.
run_compiled() {
  stage compiled 540 "$py" scripts/benchmark.py model --model "$bench_model" \
    --batch "$bench_batch" \
    ${bench_args[@]+"${bench_args[@]}"} --dtype bfloat16 --compare timm,hf,timm-compile,hf-compile \
    --repeats 3 --seconds 3 --json_out "$out/vit_b16_compiled.json"
}
run_train() {  # training only
  stage train 130 "$py" scripts/benchmark.py model --model ViT-B_16 --batch 256 --dtype bfloat16 \
    --mode train --compare timm,hf --repeats 3 --seconds 3 --json_out "$out/vit_b16_train.json"
}
run_tokens() {
  stage tokens 150 "$py" scripts/benchmark.py tokens --model ViT-B_16 --sizes 224,448,896 --batch 8 \
    --set scan=True --jobs 4 --time --variants "${TOKEN_VARIANTS:-plain,remat,fused,fused+remat}" \
    --out "$out"
}
run_explicit() {
  stage explicit 70 "$py" scripts/benchmark.py model --model ViT-B_16 --batch 256 --dtype bfloat16 \
    --mode train --repeats 2 --seconds 3 --set attention_impl=explicit
}
run_batch512() {
  stage batch512 70 "$py" scripts/benchmark.py model --model ViT-B_16 --batch 512 --dtype bfloat16 \
    --mode train --repeats 2 --seconds 3
}

run_sweep() {  # ours alone, training, one XLA knob at a time against the default: what moves MFU
  local v name
  for v in default: cublaslt:--xla_gpu_enable_cublaslt=true \
      no_triton_gemm:--xla_gpu_enable_triton_gemm=false \
      no_command_buffers:--xla_gpu_enable_command_buffer= ; do
    name=${v%%:*}
    stage "sweep_$name" 60 env XLA_FLAGS="${v#*:}" "$py" scripts/benchmark.py model \
      --model ViT-B_16 --batch 256 --dtype bfloat16 --mode train --repeats 2 --seconds 2 \
      --json_out "$out/sweep_$name.json"
  done
  stage sweep_batch384 60 "$py" scripts/benchmark.py model --model ViT-B_16 --batch 384 \
    --dtype bfloat16 --mode train --repeats 2 --seconds 2 --json_out "$out/sweep_batch384.json"
}

shift || true
for name in ${*:-env tests compiled tokens explicit batch512}; do
  "run_$name"
done
rm -f "$out/timing.lock"
echo "gpu_check: done $(date +%T)" | tee -a "$log"
