#!/usr/bin/env bash
# The conformance suite on third-party NSAs, on a CUDA GPU, in one call: every slot of each
# adapter in conformance/adapters/ in bf16, with the per-rule report of each written to $OUT.
#   usage: bash conformance/device/peer_suite.sh [fla] [nsa_triton]     (default: both)
# Needs: the GPU wheels in .device-wheels/ (flash_attn, pydantic, fla-core, einops; see the
# README's GPU section) and, for nsa_triton, a checkout of XunhaoLai/native-sparse-attention-triton
# in .peers/native-sparse-attention-triton (never committed; carry it to the GPU machine).
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
[ -f "$OUT/env.json" ] || python3 -m conformance.envinfo > "$OUT/env.json"
# One process per peer, side by side; the brute force runs on tiny CPU tensors, where one thread is
# fastest. SIGINT at the time limit still lets pytest write its summary and the per-rule report.
export OMP_NUM_THREADS=${PEER_THREADS:-1}
for peer in "${peers[@]}"; do
  mod=conformance.adapters.$peer
  echo "== $peer: python -m pytest conformance (every slot of $mod) --nsa-device=cuda --nsa-dtype=bf16"
  timeout -s INT "${PEER_TIMEOUT:-400}" python3 -m pytest conformance -q -p no:cacheprovider \
    -m "not gpu and not slow and not bench" \
    --nsa-impl=$mod:nsa_attention --nsa-cmp-impl=$mod:cmp_attention --nsa-sel-impl=$mod:sel_attention \
    --nsa-win-impl=$mod:win_attention --nsa-select-impl=$mod:select_blocks --nsa-compress-impl=$mod:compress \
    --nsa-device=cuda --nsa-dtype=bf16 --nsa-report="$OUT/$peer" > "$OUT/${peer}_pytest.log" 2>&1 &
done
wait
for peer in "${peers[@]}"; do
  echo "== $peer"; grep -E '^nsa-conformance: [0-9]+ applicable' "$OUT/${peer}_pytest.log" | tail -1
  tail -1 "$OUT/${peer}_pytest.log"
done
