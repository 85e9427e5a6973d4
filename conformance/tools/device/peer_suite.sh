#!/usr/bin/env bash
# The conformance suite on third-party NSAs, on a CUDA GPU, in one call: every slot of each
# adapter in conformance/adapters/ in bf16, with the per-rule report of each written to $OUT.
#   usage: bash conformance/tools/device/peer_suite.sh [fla] [nsa_triton]     (default: both)
# Needs: the GPU wheels in .device-wheels/ (flash_attn, pydantic, fla-core, einops; see the
# README's GPU section) and, for nsa_triton, a checkout of XunhaoLai/native-sparse-attention-triton
# in .peers/native-sparse-attention-triton (never committed; carry it to the GPU machine).
# Each peer's suite runs as SHARDS processes side by side (test files split between them: the
# peers JIT-compile their Triton kernels per shape, so one process is too slow); the shards'
# reports merge into $OUT/<peer>/report.{md,json}, their logs into $OUT/<peer>_pytest.log.
# PEER_KNOWN=1: judge with conformance/adapters/<peer>_cuda_known_deviations.yaml (the reviewed
# differences of the 2026-12-03 H200 run as strict xfails), so only new differences fail.
set -uo pipefail
OUT=${OUT:-/tmp/nsa_out}; mkdir -p "$OUT"
peers=("$@"); [ ${#peers[@]} -eq 0 ] && peers=(fla nsa_triton)
if [ ! -d .device-wheels ]; then
  echo "peer_suite.sh: needs .device-wheels/ (see the README's GPU section)" >&2; exit 2
fi
mkdir -p /tmp/site
tar -xJf .device-wheels/flash_attn-*.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .device-wheels/*.whl 2>&1 | grep -v "^WARNING: Target directory"
export PYTHONPATH=/tmp/site:$PWD/.peers/native-sparse-attention-triton:$PWD PYTHONUNBUFFERED=1
[ -f "$OUT/env.json" ] || python3 -m conformance.tools.envinfo > "$OUT/env.json"
# The brute force runs on tiny CPU tensors, where one thread is fastest.
export OMP_NUM_THREADS=${PEER_THREADS:-1}
# Shards: test files, heaviest first (one line each).
SHARDS=(
  "conformance/test_nsa.py"
  "conformance/test_sel.py"
  "conformance/test_cmp.py"
  "conformance/test_varlen.py"
  "conformance/test_causality.py"
  "conformance/test_win.py conformance/test_gradcheck.py conformance/test_decode.py"
)
shards_dir=/tmp/peer_shards; rm -rf "$shards_dir"; mkdir -p "$shards_dir"
for peer in "${peers[@]}"; do
  mod=conformance.adapters.$peer
  mkdir -p "$shards_dir/$peer"
  known=(); [ "${PEER_KNOWN:-0}" = 1 ] && known=(--nsa-known-deviations=conformance/adapters/${peer}_cuda_known_deviations.yaml)
  echo "== $peer: python -m pytest conformance (every slot of $mod) --nsa-device=cuda --nsa-dtype=bf16, ${#SHARDS[@]} shards"
  for i in "${!SHARDS[@]}"; do
    # SIGINT at the time limit still lets pytest write its summary and the shard's report.
    timeout -s INT "${PEER_TIMEOUT:-420}" python3 -m pytest ${SHARDS[$i]} -q -p no:cacheprovider \
      -m "not gpu and not slow and not bench" \
      --nsa-impl=$mod:nsa_attention --nsa-cmp-impl=$mod:cmp_attention --nsa-sel-impl=$mod:sel_attention \
      --nsa-win-impl=$mod:win_attention --nsa-select-impl=$mod:select_blocks --nsa-compress-impl=$mod:compress \
      --nsa-device=cuda --nsa-dtype=bf16 --nsa-report="$shards_dir/$peer/$i" "${known[@]}" \
      --junitxml="$shards_dir/$peer/$i/junit.xml" > "$shards_dir/$peer/$i.log" 2>&1 &
  done
done
wait
for peer in "${peers[@]}"; do
  for i in "${!SHARDS[@]}"; do echo "### shard $i: ${SHARDS[$i]}"; cat "$shards_dir/$peer/$i.log"; done > "$OUT/${peer}_pytest.log"
  dirs=(); for i in "${!SHARDS[@]}"; do dirs+=("$shards_dir/$peer/$i"); done
  python3 -m conformance.rule_report merge "$OUT/$peer" "${dirs[@]}"
done
tar -czf "$OUT/shards.tar.gz" -C "$shards_dir" .
for peer in "${peers[@]}"; do
  echo "== $peer"
  grep -E '^\*\*[0-9]+ applicable' "$OUT/$peer/report.md"
  grep -E '^[0-9]+ test functions judged' "$OUT/$peer/report.md"
  grep -hE '^[0-9]+ (passed|failed).* in [0-9.]+s|Interrupted|^(FAILED|ERROR) ' "$OUT/${peer}_pytest.log" | cut -c1-200 | head -40
done
