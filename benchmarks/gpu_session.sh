#!/usr/bin/env bash
# The GPU benchmarks in one go (about 10 minutes on one H200): the wide ResNet on all of
# Fashion-MNIST, SAM against SGD, then the ViT study in two shapes (make results' 7x7-patch
# ViT, then the 4x4-patch one); each stops cleanly at its budget and leaves its JSON in OUT
# (default: runs/gpu). A second call with the same OUT trains only the runs not finished.
# Needs Keras, NumPy and JAX (or KERAS_BACKEND=torch).
#
#   OUT=$OUT DATA=/path/to/fashion-mnist bash benchmarks/gpu_session.sh
#   python benchmarks/results_sections.py --full $OUT/full_fashion_mnist.json \
#       --vit $OUT/vit_small.json $OUT/vit.json --where "one NVIDIA H200"
set -u
OUT=${OUT:-runs/gpu}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's keras_sam
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The same model is compiled once per kind of run; the other seeds load it from this cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
timeout ${FULL_TIMEOUT:-270} $PYTHON benchmarks/full_fashion_mnist.py --data-dir "$DATA" \
    --dtype bfloat16 --epochs 10 --batch-size 128 --budget-seconds ${FULL_BUDGET:-200} \
    --out "$OUT/full_fashion_mnist.json" 2>&1 | tee "$OUT/full_fashion_mnist.log"
timeout ${VIT_SMALL_TIMEOUT:-200} $PYTHON benchmarks/vit.py --data-dir "$DATA" \
    --patch 7 --dim 64 --depth 4 --heads 4 \
    --budget-seconds ${VIT_SMALL_BUDGET:-170} --out "$OUT/vit_small.json" 2>&1 | tee "$OUT/vit_small.log"
timeout ${VIT_TIMEOUT:-260} $PYTHON benchmarks/vit.py --data-dir "$DATA" \
    --budget-seconds ${VIT_BUDGET:-230} --out "$OUT/vit.json" 2>&1 | tee "$OUT/vit.log"
