#!/usr/bin/env bash
# Every GPU measurement of this project in one command, for a machine with CUDA torch and no network.
#   benchmarks/gpu_run.sh forward host load train create tests   # any of these, in order (default: all):
#     forward  step times of every mode vs the plain model and LyCORIS, SDXL + Flux (~2 min on an H200)
#     host     host (launch) cost per T-LoRA layer call of every mode, SDXL's 700 layers (~30 s)
#     load     load_tlora vs LyCORIS for an SDXL T-LoRA, and the cached load (~2 min)
#     train    one training step at batch 4: per-sample T-LoRA vs the per-sample LyCORIS loop vs a PEFT LoRA (untimed yet)
#     create   create_tlora vs LyCORIS create_lycoris on the full SDXL UNet (untimed yet; LyCORIS alone took ~4.7 min)
#     tests    the tests marked gpu and the fused fold kernel's (~1 min)
# diffusers and lycoris-lora may come as wheels in .whl/ (see the device notes); results go to $OUT (default gpu_out).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH=$site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, diffusers, lycoris, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'lycoris', getattr(lycoris, '__version__', '4.1.3'), 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
jobs=("$@")
[ ${#jobs[@]} -eq 0 ] && jobs=(forward host load train create tests)
for job in "${jobs[@]}"; do
    case "$job" in
        forward) timeout 330 python3 benchmarks/bench_forward.py --model both 2>&1 | grep -v "LyCORIS\]" | tee "$OUT/forward.log" ;;
        host) timeout 120 python3 benchmarks/bench_host_overhead.py 2>&1 | grep -v "LyCORIS\]" | tee "$OUT/host.log" ;;
        load) timeout 300 python3 benchmarks/bench_load.py 2>&1 | grep -v "LyCORIS\]" | tee "$OUT/load.log" ;;
        train) timeout 300 python3 benchmarks/bench_train.py 2>&1 | grep -v "LyCORIS\]" | tee "$OUT/train.log" ;;
        create) timeout 400 python3 benchmarks/bench_create.py 2>&1 | grep -v "LyCORIS\]" | tee "$OUT/create.log" ;;
        tests)
            timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_fold_kernel.py 2>&1 | tee "$OUT/gpu_tests.log"
            timeout 420 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee -a "$OUT/gpu_tests.log"
            ;;
        *) echo "unknown job: $job (forward, host, load, train, create, tests)"; exit 2 ;;
    esac
done
