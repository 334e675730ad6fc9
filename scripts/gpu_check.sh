#!/usr/bin/env bash
# GPU check for a `cuda`/`cudnn` build, run on a machine with an NVIDIA GPU, torch and (from
# wheels in $WHEELS) diffusers: the engine's reference tests on the GPU, a tiny-model generation,
# then UNet/VAE timings beside diffusers on the same card and each side's peak GPU memory as
# nvidia-smi sees it (the same measure for both: CUDA context, allocator caches, everything).
#
#   scripts/gpu_check.sh BIN TESTBIN OUTDIR
#
# BIN: local-diffusers built with --features cudnn; TESTBIN: the ld-engine integration-test
# binary built with the same features (may be "-" to skip). Results go to OUTDIR: tests.log,
# bench_<family>.txt and two PNGs (few files: the device tool brings back at most eight).
# STAGES picks parts (default: all): tests generate serve bench load vram profile variants
# cputests (ROUNDS alternates ours and PyTorch in the bench that many times; default 1).
# FAMILIES (default "sd15 sdxl") picks the models for bench/vram/profile; VARIANT_FAMILY
# (default sd15; a list runs each) the ones the variants run; PRECISIONS (default fp16) the
# bench's precisions. cputests runs the engine's reference tests on this machine's processor
# (another CPU model than the development machine's, for the hand-written AVX-512 kernels).
# The tests run with NVIDIA_TF32_OVERRIDE=0: cuDNN (and PyTorch by default) run f32
# convolutions in TF32 on Ampere and later, about 1e-3 relative, and the references are f32.
set -uo pipefail
BIN=$1 TESTBIN=$2 OUT=$3
STAGES=${STAGES:-tests generate serve bench load vram profile variants cputests}
# STOP_AFTER (seconds): no stage starts later, so one device call ends inside its limit.
want() { [[ " $STAGES " == *" $1 "* ]] && (( SECONDS < ${STOP_AFTER:-100000} )); }
WHEELS=${WHEELS:-.gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
lscpu | grep -E '^(Model name|CPU family|Model:|CPU\(s\))'
grep -o -w -E 'avx512f|avx512_bf16|avx512_vnni|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo

# CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC, cuDNN, cudart) come from torch's wheels.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
libdirs=$(find "$site" /usr/local/cuda*/lib64 -name 'libcublas.so.*' -o -name 'libcudnn.so.9' \
    -o -name 'libcurand.so.*' -o -name 'libnvrtc.so.*' -o -name 'libcudart.so.*' 2>/dev/null |
    xargs -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
for lib in $(ldd "$BIN" | awk '/not found/ {print $1}'); do
    found=$(find / -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1)
    [ -n "$found" ] && LD_LIBRARY_PATH="$(dirname "$found"):$LD_LIBRARY_PATH"
done
if ldd "$BIN" | grep 'not found'; then echo "missing libraries (above)"; exit 1; fi

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -c 'import diffusers, torch; print("diffusers", diffusers.__version__, "torch", torch.__version__)'

# The engine's GPU tests: TEST_THREADS (default 4) at a time, TEST_FILTER (default: all) picks
# them, and each of TEST_VARIANTS (say LD_CUDA_GRAPHS=0) runs them again with that setting. A
# crash (a signal, not a failed test) is run again under cuda-gdb for a backtrace.
gpu_tests() {
    local log=$1; shift
    env "$@" NVIDIA_TF32_OVERRIDE=0 LD_TEST_DEVICE=cuda timeout 150 "$TESTBIN" \
        --test-threads "${TEST_THREADS:-4}" ${TEST_FILTER:-} >"$log" 2>&1
    local rc=$?
    grep -E '^test .*(FAILED|ok)$|test result|panicked' "$log" | tail -60
    if (( rc > 128 && rc != 124 )); then
        echo "== the tests crashed (exit $rc): again under cuda-gdb"
        env "$@" NVIDIA_TF32_OVERRIDE=0 LD_TEST_DEVICE=cuda timeout 200 cuda-gdb -q -batch \
            -ex 'set pagination off' -ex run -ex 'bt 40' -ex 'info threads' --args "$TESTBIN" \
            --test-threads "${TEST_THREADS:-4}" ${TEST_FILTER:-} 2>&1 |
            grep -v -E '^\[(New Thread|Thread .* exited)' | tail -90
    fi
}
if [ "$TESTBIN" != "-" ] && want tests; then
    echo "== engine reference tests on the GPU (f32 and f16 tiny models), TF32 off"
    gpu_tests "$OUT/tests.log" LD_DEFAULTS=1
    for v in ${TEST_VARIANTS:-}; do
        echo "== the same with $v"
        gpu_tests "$OUT/tests_$v.log" "$v"
    done
    echo "== layer tests with the other GPU paths (${LAYER_VARIANTS:-LD_GPU_LINEAR=candle})"
    for v in ${LAYER_VARIANTS:-LD_GPU_LINEAR=candle}; do
        env "$v" NVIDIA_TF32_OVERRIDE=0 LD_TEST_DEVICE=cuda timeout 60 "$TESTBIN" layers 2>&1 |
            grep -E '^test .*(FAILED|ok)$|test result|panicked|differs' | tail -20
    done
fi

if want generate; then
echo "== tiny SD1 generation on the GPU, fp32 (compare with the CPU's image)"
NVIDIA_TF32_OVERRIDE=0 timeout 60 "$BIN" generate "a red cube on a table" --model models/tiny/sd1 --steps 8 --seed 42 \
    --width 64 --height 64 --precision fp32 --out "$OUT/tiny_sd1_gpu_fp32.png" 2>&1 | tail -3
timeout 60 "$BIN" generate "a red cube on a table" --model models/tiny/sd1 --steps 8 --seed 42 \
    --width 64 --height 64 --precision fp16 --out "$OUT/tiny_sd1_gpu_fp16.png" 2>&1 | tail -3
fi

if want serve; then
echo "== what the app detects on this machine, then server jobs whole and staged (tiny models)"
timeout 60 "$BIN" --data-dir /tmp/ld-doctor doctor 2>&1 | tail -40
timeout 240 python3 scripts/gpu_serve_check.py "$BIN" "$OUT"
fi

# Peak GPU memory of one command, sampled every 20 ms, minus what was in use before it.
vram_peak() {
    local log=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"$log" &
    local smi=$!
    sleep 0.5
    "$@"
    local rc=$?
    sleep 0.3
    kill $smi
    echo "rc=$rc peak_mib=$(sort -n "$log" | tail -1) idle_mib=$(head -1 "$log")"
}

for fam in ${FAMILIES:-sd15 sdxl}; do
    if want bench; then
        for prec in ${PRECISIONS:-fp16}; do
            echo "== $fam $prec side by side (median of 10 after a warm-up)"
            timeout 200 "$BIN" bench --family $fam --precision $prec --python python3 --repeats 10 \
                --rounds "${ROUNDS:-1}" 2>&1 | tee "$OUT/bench_${fam}_$prec.txt"
        done
    fi
done
if want load; then
    echo "== SD1.5 512x512 generation, ${LOAD_STEPS:-20} steps, fp16: load, whole run and peak GPU memory beside diffusers"
    timeout 300 python3 scripts/bench_load_memory.py --ours "$BIN" --device cuda --steps "${LOAD_STEPS:-20}" \
        --repeat "${LOAD_REPEAT:-2}" --folder /tmp/sd15-random 2>&1 | tee "$OUT/load_sd15.txt"
fi
for fam in ${FAMILIES:-sd15 sdxl}; do
    if want vram; then
        echo "== $fam peak GPU memory, ours"
        vram_peak "/tmp/vram_ours_$fam.log" timeout 120 "$BIN" bench --family $fam --precision fp16 \
            --no-torch --repeats 2 --json
        echo "== $fam peak GPU memory, diffusers"
        vram_peak "/tmp/vram_torch_$fam.log" timeout 120 python3 scripts/bench_pytorch.py --family $fam \
            --device cuda --precision fp16 --repeats 2 --json
    fi
    if want profile; then
        echo "== $fam fp16 time per layer kind, ours"
        LD_LAYER_TIMES=1 timeout 120 "$BIN" bench --family $fam --precision fp16 --no-torch --repeats 3 \
            2>&1 | tee "$OUT/profile_$fam.txt"
    fi
done
if want variants; then
    # Our GPU layers against candle's own (or the materialised attention), cuDNN's algorithm
    # measured per shape instead of fixed, steps without CUDA graphs; the default first, in the
    # same call.
    for vf in ${VARIANT_FAMILY:-sd15}; do
        for v in LD_DEFAULTS=1 ${VARIANTS:-LD_CUDA_GRAPHS=0 LD_GPU_ATTN=candle LD_GPU_LINEAR=candle LD_GPU_CONV=candle LD_GPU_NORM=candle LD_CUDNN_ALGO=find}; do
            echo "== $vf fp16 with $v"
            env "$v" timeout 90 "$BIN" bench --family "$vf" --precision fp16 --no-torch \
                --repeats 10 2>&1 | grep -E "step|decode|queueing"
        done
    done
fi
if [ "$TESTBIN" != "-" ] && want cputests; then
    echo "== engine reference tests on this machine's CPU ($(nproc) threads)"
    # The bf16 test flips a process-wide switch: alone, after the others.
    { timeout 150 "$TESTBIN" --test-threads "$(nproc)" --skip bf16 2>&1
      timeout 60 "$TESTBIN" bf16 --test-threads 1 2>&1; } | tee "$OUT/cputests.log" |
        grep -E '^test .*FAILED$|test result|panicked' | tail -30
fi
