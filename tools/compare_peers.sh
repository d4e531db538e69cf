#!/usr/bin/env bash
# Side-by-side CPU latency of this project and the two PyTorch peers, measured in ONE run,
# alternating the candidates round by round so machine noise hits all of them alike.
#
# usage: tools/compare_peers.sh [COEF=0] [SIZE=512] [ROUNDS=3] [ITERS=15] [SET=full|short]
# env:   THREADS (2), PY (python3); for the peer rows: PEER_PY (python of the peer environment),
#        ZYLO (Yet-Another-EfficientDet-Pytorch checkout), PEER_SCRIPT
#        (default ../shared/tools/peer_bench/peer_forward.py beside the repository)
#
# Peers: Yet-Another-EfficientDet-Pytorch and effdet (tf_efficientdet_dC), timed by the peer
# script (forward only, random weights, 90 classes, batch 1), and effdet's ONNX export run by
# onnxruntime with our backend's settings (row 'peer effdet_onnxruntime'); see its README for the setup
# (../shared/tools/peer_bench). Ours: benchmark.py with random weights, 90 classes, batch 1,
# forward and end2end, in the settings listed below ('default' = fused + channels_last + CPU fast
# path + --tune_malloc; SET=short: the default torch backend, with and without --tune_malloc, and
# onnxruntime only). Each round runs every candidate once (ITERS timed runs after warm-up);
# the table shows the median over rounds of each candidate's per-round median, and ratios
# against the peers' forward pass. Nothing of the peers is imported into this project.
set -euo pipefail
COEF=${1:-0}
SIZE=${2:-512}
ROUNDS=${3:-3}
ITERS=${4:-15}
SET=${5:-full}
THREADS=${THREADS:-2}
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PEER_PY=${PEER_PY:-}
PEER_SCRIPT=${PEER_SCRIPT:-$HERE/../shared/tools/peer_bench/peer_forward.py}
export ZYLO=${ZYLO:-}
OUT=$(mktemp -d -t compare_peers.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

have_peers=1
if [[ -z "$PEER_PY" || ! -x "$PEER_PY" || ! -f "$PEER_SCRIPT" || -z "$ZYLO" || ! -d "$ZYLO" ]]; then
  echo "peers not set up (set PEER_PY, ZYLO and PEER_SCRIPT; see ../shared/tools/peer_bench/README.md):" \
       "timing this project only" >&2
  have_peers=0
fi

if [[ "$SET" == full ]]; then
  CONFIGS=("plain:--no-fuse --no-channels_last --no-tune_malloc"
           "fused:--no-channels_last --no-fast --no-tune_malloc"
           "fused_cl:--no-fast --no-tune_malloc"
           "fused_cl_fast:--no-tune_malloc"
           "default:"
           "onnxruntime:--backend onnxruntime --model $OUT/model.onnx")
else
  CONFIGS=("fused_cl_fast:--no-tune_malloc" "default:" "onnxruntime:--backend onnxruntime --model $OUT/model.onnx")
fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
echo "exporting D$COEF at $SIZE to ONNX once (not timed)" >&2
(cd "$HERE" && $PY -m efficientdet.export onnx -c "$COEF" --num_classes 90 --image_size "$SIZE" \
   -o "$OUT/model.onnx" --no-verify > /dev/null)

# effdet's own ONNX export, run by the same onnxruntime settings as ours (forward only): the
# reference for what onnxruntime makes of this network on this CPU. Needs onnx in the peer venv.
have_effdet_onnx=0
if [[ $have_peers == 1 ]]; then
  (cd "$OUT" && "$PEER_PY" - "$COEF" "$SIZE" "$OUT/effdet.onnx" > /dev/null 2>&1 <<'PY'
import sys, torch
from effdet import create_model
c, s, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
m = create_model(f'tf_efficientdet_d{c}', pretrained=False, pretrained_backbone=False, num_classes=90,
                 image_size=(s, s)).eval()
with torch.no_grad():
    torch.onnx.export(m, (torch.randn(1, 3, s, s),), path, opset_version=17, dynamo=False)
PY
  ) && have_effdet_onnx=1 || echo "effdet ONNX export failed (pip install onnx in the peer venv): row skipped" >&2
fi

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  if [[ $have_peers == 1 ]]; then
    (cd "$OUT" && THREADS=$THREADS "$PEER_PY" "$PEER_SCRIPT" "$COEF" "$SIZE" "$ITERS" 2>/dev/null \
       | grep -E 'median' > "$OUT/peer_$r.txt") || echo "peer run failed in round $r" >&2
  fi
  if [[ $have_effdet_onnx == 1 ]]; then
    PYTHONPATH="$HERE" $PY - "$OUT/effdet.onnx" "$SIZE" "$THREADS" "$ITERS" > "$OUT/peer_ort_$r.txt" <<'PY'
import statistics, sys, time
import numpy as np
from efficientdet.backends import OnnxRuntimeModel  # the very session settings of our backend
path, size, threads, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sess = OnnxRuntimeModel(path, threads).session
feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, size, size), np.float32)}
for _ in range(3):
    sess.run(None, feed)
ts = []
for _ in range(iters):
    t = time.perf_counter(); sess.run(None, feed); ts.append(time.perf_counter() - t)
print(f'effdet_onnxruntime median {statistics.median(ts) * 1000:.1f} ms')
PY
  fi
  for cfg in "${CONFIGS[@]}"; do
    name=${cfg%%:*}
    flags=${cfg#*:}
    for mode in forward end2end; do
      # shellcheck disable=SC2086
      (cd "$HERE" && $PY benchmark.py -c "$COEF" --image_size "$SIZE" --threads "$THREADS" --iters "$ITERS" \
         --warmup 3 --mode $mode $flags --json "$OUT/ours_${name}_${mode}_$r.json" > /dev/null)
    done
  done
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
$PY - "$OUT" "$COEF" "$SIZE" "$THREADS" "$ROUNDS" "$ITERS" "$LOAD_START" "$LOAD_END" <<'PY'
import glob, json, os, re, statistics, sys
out, coef, size, threads, rounds, iters, load0, load1 = sys.argv[1:]
rows = {}
for path in sorted(glob.glob(os.path.join(out, 'peer_*.txt'))):
    for line in open(path):
        m = re.match(r'\s*(zylo117|effdet_onnxruntime|effdet)\S*\s.*?median\s+([\d.]+)\s*ms', line)
        if m:
            rows.setdefault((f'peer {m.group(1)}', 'forward'), []).append(float(m.group(2)))
device = None
for path in sorted(glob.glob(os.path.join(out, 'ours_*.json'))):
    r = json.load(open(path))
    name = os.path.basename(path)[5:].rsplit('_', 2)[0]
    rows.setdefault((f'ours {name}', r['mode']), []).append(r['latency_ms_median'])
    device = r['device']
med = {k: statistics.median(v) for k, v in rows.items()}
zy = med.get(('peer zylo117', 'forward'))
ed = med.get(('peer effdet', 'forward'))
print(f'D{coef} {size}x{size}, batch 1, {threads} threads, {device}; {rounds} rounds x {iters} timed runs; '
      'median of per-round medians (ms)')
print(f'load average (1/5/15 min) at start {load0}, at end {load1}: above the thread count means a shared, noisy CPU')
print(f'{"candidate":26s} {"mode":8s} {"ms":>8s} {"runs":>5s} {"Yet-Another/x":>14s} {"effdet/x":>9s}')
for (name, mode), v in sorted(med.items(), key=lambda kv: (not kv[0][0].startswith('peer'), kv[0][1], -kv[1])):
    a = f'{zy / v:.2f}x' if zy else '-'
    b = f'{ed / v:.2f}x' if ed else '-'
    print(f'{name:26s} {mode:8s} {v:8.1f} {len(rows[(name, mode)]):5d} {a:>14s} {b:>9s}')
PY
