#!/usr/bin/env bash
# The GPU pass in stages that each fit one call of the device tool (10 minutes a call, 30 minutes of device time a
# session, no network there, and a call may land on a fresh machine). Run from the repository root:
#
#   bash scripts/gpu_pass.sh setup                 versions, build (or reuse a carried build), backends present
#   bash scripts/gpu_pass.sh tests [pytest args]   the whole test suite on the GPU (pytest-xdist, 8 workers)
#   bash scripts/gpu_pass.sh sanitizer [tests...]  compute-sanitizer memcheck on the CUDA-backend tests
#   bash scripts/gpu_pass.sh bench NAME [pytest args]   a part of `pytest benchmarks/` -> bench-NAME.json
#   bash scripts/gpu_pass.sh profile OP CASE [profile_case.py args]   ncu on one case's fwd+bwd
#
# Every stage runs `setup` first (it is cheap once the extension is built) and writes its log and files under
# $OUT (the device tool's folder that comes back; default ./gpu_pass_out). What comes back from $OUT:
#   gpu_build/_C*.so + gpu_build/stamp   the built extension; copy the folder to .gpu_build/ here (ignored by git)
#                                        and name it in the next call's `carry` to skip the build on a fresh machine
#   <stage>.log, tests.xml, bench-NAME.json, ncu-*.txt
# Missing Python packages travel as wheels in .whl/ (carried): only `bcos` (0.1.3, pure Python) is not in the
# GPU image. Merge the bench parts here: python benchmarks/report.py --merge OUT.json bench-*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_pass_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# the checkout itself is the package: no pip install (nothing can be fetched there), the extension is built in place
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Each stage stops itself before the device tool's 10-minute limit so its log still comes back: what runs after
# setup gets the seconds left of STAGE_LIMIT (counted from the script's start, the build included).
STAGE_LIMIT=${STAGE_LIMIT:-560}
left() { local s=$((STAGE_LIMIT - SECONDS)); echo $((s > 30 ? s : 30)); }

log() { echo "[gpu_pass $(date +%H:%M:%S)] $*"; }

setup() {
  log "setup"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { log "installing the carried wheels failed"; return 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  local torch_version
  torch_version=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda)") || return 1
  log "torch/cuda: $torch_version; triton: $("$PY" -c 'import triton; print(triton.__version__)' 2>&1)"
  # the build is reused while torch and the sources it was built from are the same
  local stamp="$torch_version $(cat setup.py csrc/*.* csrc/*/*.* | sha1sum | cut -c1-16)"
  if [[ ! -f bcos_kernels/.gpu_build_stamp || "$(cat bcos_kernels/.gpu_build_stamp)" != "$stamp" ]]; then
    if [[ -f .gpu_build/stamp && "$(cat .gpu_build/stamp)" == "$stamp" ]]; then
      log "using the carried build in .gpu_build/"
      cp .gpu_build/_C*.so bcos_kernels/
    else
      log "building the extension with CUDA (MAX_JOBS=${MAX_JOBS:=$(nproc)})"
      local start=$SECONDS
      MAX_JOBS=$MAX_JOBS "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
        || { tail -50 "$OUT/build.log"; log "build failed (build.log)"; return 1; }
      log "built in $((SECONDS - start)) s"
    fi
    echo "$stamp" > bcos_kernels/.gpu_build_stamp
  fi
  mkdir -p "$OUT/gpu_build" && cp bcos_kernels/_C*.so "$OUT/gpu_build/" && cp bcos_kernels/.gpu_build_stamp \
    "$OUT/gpu_build/stamp"
  "$PY" - <<'EOF' || return 1
import bcos_kernels, bcos_kernels._C, torch
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for op in ("bcos_conv2d", "bcos_linear", "dau_conv2d", "lwta", "class_specific_gate"):
    print(f"{op}: {bcos_kernels.available_backends('cuda', op)}")
missing = {"cuda", "triton"} - set(bcos_kernels.available_backends("cuda", "bcos_conv2d"))
if missing:
    raise SystemExit(f"GPU backends missing: {sorted(missing)}")
try:
    import bcos.modules  # noqa: F401  (the originals the tests and benchmarks compare with)
    print("bcos (original) importable")
except ImportError as e:
    print("WARNING: bcos not importable (carry its wheel in .whl/):", e)
EOF
}

stage=${1:-}
shift || true
case "$stage" in
  setup)
    setup 2>&1 | tee "$OUT/setup.log"
    rc=$? ;;
  tests)
    { setup && log "tests" && timeout "$(left)" "$PY" -m pytest tests/ -q -n "${WORKERS:-8}" -p no:cacheprovider \
        --timeout 300 --junitxml "$OUT/tests.xml" "$@"; } 2>&1 | tee "$OUT/tests.log"
    rc=$? ;;
  sanitizer)
    # No caching allocator: memcheck then sees each tensor as its own allocation, so a read past a tensor's end
    # is reported instead of landing in the pool's next block.
    targets=("$@")
    [[ ${#targets[@]} -eq 0 ]] && targets=(tests/test_cuda_backend.py tests/test_channel_scale_kernels.py)
    { setup && log "compute-sanitizer memcheck: ${targets[*]}" && PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        timeout "$(left)" compute-sanitizer --tool memcheck --error-exitcode 86 --target-processes all \
        "$PY" -m pytest "${targets[@]}" -q -x -p no:cacheprovider; } 2>&1 | tee "$OUT/sanitizer.log"
    rc=$? ;;
  bench)
    name=${1:?usage: gpu_pass.sh bench NAME [pytest args]}
    shift
    [[ $# -eq 0 ]] && set -- benchmarks/
    { setup && log "bench $name: $*" && rm -rf "$OUT/bench.tmp" && BCOS_BENCH_OUT="$OUT/bench.tmp" \
        timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider "$@"; } 2>&1 | tee "$OUT/bench-$name.log"
    rc=$?
    for f in "$OUT"/bench.tmp/*.json; do [[ -f $f ]] && mv "$f" "$OUT/bench-$name.json"; done
    rm -rf "$OUT/bench.tmp" ;;
  profile)
    [[ $# -ge 2 ]] || { echo "usage: gpu_pass.sh profile OP CASE [profile_case.py args]"; exit 2; }
    tag=$(echo "$*" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-80)
    { setup && log "ncu: $*" && timeout "$(left)" ncu --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        "$PY" scripts/profile_case.py "$@"; } > "$OUT/ncu-$tag.txt" 2>&1
    rc=$?
    tail -40 "$OUT/ncu-$tag.txt" ;;
  *)
    sed -n '2,17p' "$0"
    exit 2 ;;
esac
log "$stage: exit status $rc"
exit "$rc"
