#!/usr/bin/env bash
# One call on the lent GPU: set up pydantic + flash_attn wheels, record the environment, run the
# GPU conformance suite for both providers, then the timing sweep. Everything lands in $OUT.
#   usage: bash conformance/tools/device/gpu_run.sh [pytest|bench|all|probes|fuzz|contract_fuzz|decode|peers|canary] [extra args...]
#   peers:  NSA prefill vs the peers (PEERS_DIR: folder holding Scalable-Flash-NSA/ and
#           native-sparse-attention-triton/ checkouts, never committed) and full causal FA-2, paper
#           layout (PEERS_T) then FLA's (FLA_T), the window on FA-2 vs FlexAttention (WIN_T), the
#           per-stage breakdown if STAGES_T is set (kernel tables with STAGES_PROFILE=1), peer_report
#   canary: the training canary (python -m conformance.canary --device cuda, extra args go to it)
#           into $OUT/canary, log in $OUT/canary.log; about 45 s a run at its defaults with --batch 2
#   decode: the fast decode step's GPU tests (tests/nsa_ref/test_decode_fast.py -m gpu), then
#           conformance/tools/device/decode_bench.py (extra args go to it) into $OUT/decode_bench
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/nsa_out}; mkdir -p "$OUT"
if [ ! -d .device-wheels ]; then
  echo "gpu_run.sh: needs .device-wheels/ (pydantic + flash_attn wheels for the GPU image; see the" >&2
  echo "  README's GPU section), or run the same steps with flash-attn installed: pip install -e '.[test,flash]'" >&2
  exit 2
fi
mkdir -p /tmp/site
tar -xJf .device-wheels/flash_attn-*.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m conformance.tools.envinfo > "$OUT/env.json"; cat "$OUT/env.json"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/nvidia_smi.csv" 2>&1
if [ "$what" = pytest ] || [ "$what" = all ]; then
  NSA_REQUIRE_PROVIDERS=flash_attn,torch NSA_PARITY_REPORT="$OUT/gpu_parity.json" \
    timeout "${PYTEST_TIMEOUT:-420}" python3 -m pytest ${PYTEST_TARGET:-conformance} -m gpu -q -p no:cacheprovider --maxfail=20 \
    --junitxml="$OUT/gpu_junit.xml" 2>&1 | tee "$OUT/gpu_pytest.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "${BENCH_TIMEOUT:-540}" python3 -m conformance.tools.bench --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^W1"
fi
if [ "$what" = probes ]; then
  timeout "${PROBES_TIMEOUT:-240}" python3 -m conformance.tools.probes.runner --out "$OUT/fa2_harden" --jobs 4 --timeout 200 2>&1 | tee "$OUT/probes.log" | tail -45
fi
if [ "$what" = fuzz ]; then
  timeout "${FUZZ_TIMEOUT:-330}" python3 -m conformance.tools.fuzz --profile device --out "$OUT/fuzz" 2>&1 | tee "$OUT/fuzz.log" | tail -30
fi
if [ "$what" = contract_fuzz ]; then
  # Every entry point of both providers, >= 10,000 calls; kernels stop at --budget, outputs are written after.
  timeout "${CONTRACT_FUZZ_TIMEOUT:-500}" python3 conformance/tools/device/contract_fuzz.py \
    --calls "${CONTRACT_FUZZ_CALLS:-12000}" --workers "${CONTRACT_FUZZ_WORKERS:-4}" --budget "${CONTRACT_FUZZ_BUDGET:-360}" \
    --out "$OUT/contract_fuzz" 2>&1 | tee "$OUT/contract_fuzz.log" | tail -40
fi
if [ "$what" = decode ]; then
  timeout "${PYTEST_TIMEOUT:-240}" python3 -m pytest tests/nsa_ref/test_decode_fast.py -m gpu -q -p no:cacheprovider -rfEs \
    --junitxml="$OUT/decode_gpu_junit.xml" 2>&1 | tee "$OUT/decode_gpu_pytest.log" | tail -30
  timeout "${BENCH_TIMEOUT:-300}" python3 conformance/tools/device/decode_bench.py --out "$OUT/decode_bench" --plot "$@" \
    2>&1 | tee "$OUT/decode_bench.log" | tail -25
fi
if [ "$what" = canary ]; then
  timeout "${CANARY_TIMEOUT:-540}" python3 -m conformance.canary --device cuda --out "$OUT/canary" "$@" 2>&1 \
    | tee "$OUT/canary.log" | tail -30
fi
if [ "$what" = peers ]; then
  PEERS_DIR=${PEERS_DIR:-../.peers}
  T=${PEERS_T:-4096,8192,16384,32768,65536,131072}
  timeout "${BENCH_TIMEOUT:-300}" python3 -m conformance.tools.bench --branches nsa \
    --paths triton,triton:shapes,peer:flash_nsa,peer:nsa_triton --T "$T" --out "$OUT/peers" \
    --peer-path "$PEERS_DIR/Scalable-Flash-NSA" --peer-path "$PEERS_DIR/native-sparse-attention-triton" "$@" \
    2>&1 | tee "$OUT/peers.log" | grep -v "^W1"
  timeout "${FULL_BENCH_TIMEOUT:-120}" python3 -m conformance.tools.bench --branches full_causal \
    --paths fa2:flash_attn --T "$T" --out "$OUT/peers" "$@" 2>&1 | tee -a "$OUT/peers.log" | grep -v "^W1"
  # FLA autotunes per shape (about 30 s a case): its family at FLA_T only.
  timeout "${FLA_BENCH_TIMEOUT:-180}" python3 -m conformance.tools.bench --branches nsa --family fla \
    --paths triton,peer:fla --T "${FLA_T:-8192,65536}" --out "$OUT/peers" "$@" 2>&1 | tee -a "$OUT/peers.log" | grep -v "^W1"
  # The window on FA-2 against FlexAttention (issue 18: FA-2 keeps win, or why not).
  timeout "${WIN_BENCH_TIMEOUT:-90}" python3 -m conformance.tools.bench --branches win --paths fa2:flash_attn,flex \
    --T "${WIN_T:-65536}" --out "$OUT/win" 2>&1 | tee "$OUT/win.log" | grep -v "^W1"
  if [ -n "${STAGES_T:-}" ]; then
    timeout "${STAGES_TIMEOUT:-150}" python3 -m conformance.tools.stages --T "$STAGES_T" ${STAGES_PROFILE:+--profile} \
      --out "$OUT/stages" 2>&1 | tee "$OUT/stages.log" | tail -40
  fi
  python3 -m conformance.tools.peer_report "$OUT/peers/bench.csv" 2>&1 | tail -45
fi
