#!/usr/bin/env bash
# Side-by-side CPU latency of this project and the two PyTorch peers, measured in ONE run,
# alternating the candidates round by round so machine noise hits all of them alike.
#
# usage: tools/compare_peers.sh [COEFS=0] [SIZE=auto] [ROUNDS=3] [ITERS=15] [SET=full|short|targets|edge]
#        COEFS: one variant or a comma list (0,1,2,3 or lite0,lite1,...: one row block per variant, all in
#        the same rounds; the peers are timed for D variants only);
#        SIZE: input side, or 'auto' for each variant's own size (512, 640, 768, 896 ...)
# env:   THREADS (2), BATCH (8: the throughput rows), PY (python3), CALIB_DATA (SET=edge: a folder holding
#        coco/ with train2017 images and annotations, calibrated on for the int8 files; default
#        ../shared/data/coco_tiny beside the repository, linked as coco/), CALIB_IMAGES (64);
#        for the peer rows: PEER_PY (python
#        of the peer environment), ZYLO (Yet-Another-EfficientDet-Pytorch checkout), PEER_SCRIPT
#        (default ../shared/tools/peer_bench/peer_forward.py beside the repository)
#
# Peers: Yet-Another-EfficientDet-Pytorch and effdet (tf_efficientdet_dC), timed by the peer
# script (forward only, random weights, 90 classes, batch 1), and effdet's ONNX export run by
# onnxruntime with our backend's settings (row 'peer effdet_onnxruntime'); see its README for the setup
# (../shared/tools/peer_bench). Ours: benchmark.py with random weights, 90 classes, forward and
# end2end (stage by stage in the JSON), in the settings listed below ('default' = the torch backend:
# fused + channels_last + CPU fast path + --tune_malloc). SET=full: the torch optimisation steps one
# by one, --compile (torch.compile; compiled in each round's warm-up, not timed), onnxruntime and
# openvino; SET=short: default, onnxruntime, openvino; SET=targets: default, onnxruntime, openvino, the
# --half rows of torch (bfloat16 autocast on a CPU) and openvino (bfloat16 or float16 inference), plus
# batch-BATCH throughput rows (images/s) of default and openvino for the first variant of COEFS;
# SET=edge: default, onnxruntime, openvino, openvino int8 (NNCF), litert float32 and litert int8
# (ai-edge-quantizer; heads float32, the export's default), the int8 files calibrated on
# CALIB_IMAGES training images of project coco (90 classes, like the other rows). Each
# round runs every candidate once (ITERS timed runs after warm-up); the table shows the median over
# rounds of each candidate's per-round median, and ratios against the peers' forward pass. Nothing of
# the peers is imported into this project.
set -euo pipefail
COEFS=${1:-0}
SIZE_ARG=${2:-auto}
ROUNDS=${3:-3}
ITERS=${4:-15}
SET=${5:-full}
THREADS=${THREADS:-2}
BATCH=${BATCH:-8}
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

configs_for() {  # $1: folder of this variant's exports, $2: 1 for the first variant of COEFS
  local m=$1 first=$2
  case "$SET" in
    full) CONFIGS=("plain:--no-fuse --no-channels_last --no-tune_malloc"
                   "fused:--no-channels_last --no-fast --no-tune_malloc"
                   "fused_cl:--no-fast --no-tune_malloc"
                   "fused_cl_fast:--no-tune_malloc"
                   "default:"
                   "default_compile:--compile"
                   "onnxruntime:--backend onnxruntime -w $m/model.onnx"
                   "openvino:--backend openvino -w $m/model.xml") ;;
    targets) CONFIGS=("default:"
                      "onnxruntime:--backend onnxruntime -w $m/model.onnx"
                      "openvino:--backend openvino -w $m/model.xml"
                      "default_half:--half"
                      "openvino_half:--backend openvino -w $m/model.xml --half")
             if [[ $first == 1 ]]; then  # throughput rows for the first variant only (time)
               CONFIGS+=("default_b${BATCH}:--batch_size $BATCH"
                         "openvino_b${BATCH}:--backend openvino -w $m/model.xml --batch_size $BATCH")
             fi ;;
    edge) CONFIGS=("default:"
                   "onnxruntime:--backend onnxruntime -w $m/model.onnx"
                   "openvino:--backend openvino -w $m/model.xml"
                   "openvino_int8:--backend openvino -w $m/model_int8.xml"
                   "litert:--backend litert -w $m/model.tflite"
                   "litert_int8:--backend litert -w $m/model_int8.tflite") ;;
    *) CONFIGS=("default:"
                "onnxruntime:--backend onnxruntime -w $m/model.onnx"
                "openvino:--backend openvino -w $m/model.xml") ;;
  esac
}

size_of() {  # the input side of variant $1
  if [[ "$SIZE_ARG" == auto ]]; then
    (cd "$HERE" && $PY -c "import sys; from efficientdet.config import get_config, parse_variant; \
print(get_config(parse_variant(sys.argv[1])).input_size)" "$1")
  else
    echo "$SIZE_ARG"
  fi
}

IFS=',' read -r -a COEF_LIST <<< "$COEFS"
if [[ "$SET" == edge ]]; then  # the int8 exports calibrate on training images of project coco
  CALIB_SRC=${CALIB_DATA:-$HERE/../shared/data/coco_tiny}
  CALIB_IMAGES=${CALIB_IMAGES:-64}
  if [[ -d "$CALIB_SRC/coco" ]]; then CALIB="$CALIB_SRC"; else mkdir -p "$OUT/calib"; ln -s "$(cd "$CALIB_SRC" && pwd)" "$OUT/calib/coco"; CALIB="$OUT/calib"; fi
fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
for COEF in "${COEF_LIST[@]}"; do
  SIZE=$(size_of "$COEF")
  M="$OUT/c$COEF"
  mkdir -p "$M"
  echo "$SIZE" > "$M/size"
  echo "exporting $COEF at $SIZE to ONNX and OpenVINO once (not timed)" >&2
  (cd "$HERE" && $PY -m efficientdet.export onnx -c "$COEF" --num_classes 90 -w random --image_size "$SIZE" \
     -o "$M/model.onnx" --no_verify > /dev/null)
  (cd "$HERE" && $PY -m efficientdet.export openvino -c "$COEF" --num_classes 90 -w random --image_size "$SIZE" \
     -o "$M/model.xml" --no_verify > /dev/null) || echo "openvino export failed (pip install openvino)" >&2
  if [[ "$SET" == edge ]]; then  # float32 LiteRT and the two int8 files (random weights, 90 classes)
    echo "exporting $COEF at $SIZE to LiteRT float32, LiteRT int8 and OpenVINO int8 (not timed)" >&2
    (cd "$HERE" && $PY -m efficientdet.export tflite -c "$COEF" --num_classes 90 -w random --image_size "$SIZE" \
       -o "$M/model.tflite" --no_verify > /dev/null) || echo "litert export failed (pip install .[litert])" >&2
    (cd "$HERE" && $PY -m efficientdet.export tflite -c "$COEF" -p coco -w random --image_size "$SIZE" --int8 \
       --data_path "$CALIB" --calib_images "$CALIB_IMAGES" -o "$M/model_int8.tflite" --no_verify > /dev/null) \
       || echo "litert int8 export failed" >&2
    (cd "$HERE" && $PY -m efficientdet.export openvino -c "$COEF" -p coco -w random --image_size "$SIZE" --int8 \
       --data_path "$CALIB" --calib_images "$CALIB_IMAGES" -o "$M/model_int8.xml" --no_verify > /dev/null) \
       || echo "openvino int8 export failed (pip install nncf)" >&2
  fi
  # effdet's own ONNX export, run by the same onnxruntime settings as ours (forward only): the
  # reference for what onnxruntime makes of this network on this CPU. Needs onnx in the peer venv.
  if [[ $have_peers == 1 && "$COEF" =~ ^[0-9]+$ ]]; then  # the peers have no Lite variants
    (cd "$OUT" && "$PEER_PY" - "$COEF" "$SIZE" "$M/effdet.onnx" > /dev/null 2>&1 <<'PY'
import sys, torch
from effdet import create_model
c, s, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
m = create_model(f'tf_efficientdet_d{c}', pretrained=False, pretrained_backbone=False, num_classes=90,
                 image_size=(s, s)).eval()
with torch.no_grad():
    torch.onnx.export(m, (torch.randn(1, 3, s, s),), path, opset_version=17, dynamo=False)
PY
    ) || echo "effdet ONNX export failed (pip install onnx in the peer venv): row skipped" >&2
  fi
done

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  for COEF in "${COEF_LIST[@]}"; do
    M="$OUT/c$COEF"
    SIZE=$(cat "$M/size")
    if [[ $have_peers == 1 && "$COEF" =~ ^[0-9]+$ ]]; then
      (cd "$OUT" && THREADS=$THREADS "$PEER_PY" "$PEER_SCRIPT" "$COEF" "$SIZE" "$ITERS" 2>/dev/null \
         | grep -E 'median' > "$M/peer_$r.txt") || echo "peer run failed in round $r" >&2
    fi
    if [[ -f "$M/effdet.onnx" ]]; then
      PYTHONPATH="$HERE" $PY - "$M/effdet.onnx" "$SIZE" "$THREADS" "$ITERS" > "$M/peer_ort_$r.txt" <<'PY'
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
    configs_for "$M" "$([[ $COEF == "${COEF_LIST[0]}" ]] && echo 1 || echo 0)"
    for cfg in "${CONFIGS[@]}"; do
      name=${cfg%%:*}
      flags=${cfg#*:}
      for mode in forward end2end; do
        # shellcheck disable=SC2086
        (cd "$HERE" && $PY benchmark.py -c "$COEF" --num_classes 90 -w random --image_size "$SIZE" --threads "$THREADS" \
           --iters "$ITERS" --warmup 3 --mode $mode $flags --json "$M/ours_${name}_${mode}_$r.json" > /dev/null) \
           || echo "$COEF $name $mode failed in round $r" >&2
      done
    done
  done
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
$PY - "$OUT" "$THREADS" "$ROUNDS" "$ITERS" "$LOAD_START" "$LOAD_END" <<'PY'
import glob, json, os, re, statistics, sys
out, threads, rounds, iters, load0, load1 = sys.argv[1:]
device = None
blocks = []
for folder in sorted(glob.glob(os.path.join(out, 'c*')), key=lambda p: os.path.basename(p)):
    rows, ips, e2e_minus_fwd = {}, {}, {}
    for path in sorted(glob.glob(os.path.join(folder, 'peer_*.txt'))):
        for line in open(path):
            m = re.match(r'\s*(zylo117|effdet_onnxruntime|effdet)\S*\s.*?median\s+([\d.]+)\s*ms', line)
            if m:
                rows.setdefault((f'peer {m.group(1)}', 'forward', 1), []).append(float(m.group(2)))
    for path in sorted(glob.glob(os.path.join(folder, 'ours_*.json'))):
        r = json.load(open(path))
        name = os.path.basename(path)[5:].rsplit('_', 2)[0]
        key = (f'ours {name}', r['mode'], r['batch_size'])
        rows.setdefault(key, []).append(r['latency_ms_median'])
        ips.setdefault(key, []).append(r['images_per_second'])
        if 'end2end_minus_forward_ms_median' in r:
            e2e_minus_fwd.setdefault(key, []).append(r['end2end_minus_forward_ms_median'])
        device = r['device']
    if rows:
        blocks.append((os.path.basename(folder)[1:], open(os.path.join(folder, 'size')).read().strip(), rows, ips,
                       e2e_minus_fwd))
print(f'{threads} threads, {device}; {rounds} rounds x {iters} timed runs; median of per-round medians (ms)')
print(f'load average (1/5/15 min) at start {load0}, at end {load1}: above the thread count means a shared, noisy CPU')
for coef, size, rows, ips, e2e in blocks:
    med = {k: statistics.median(v) for k, v in rows.items()}
    zy = med.get(('peer zylo117', 'forward', 1))
    ed = med.get(('peer effdet', 'forward', 1))
    print(f'\n{"D" + coef if coef.isdigit() else coef} {size}x{size}')
    print(f'{"candidate":26s} {"mode":8s} {"batch":>5s} {"ms":>8s} {"images/s":>9s} {"e2e-fwd":>8s} {"runs":>5s} '
          f'{"Yet-Another/x":>14s} {"effdet/x":>9s}')
    for (name, mode, b), v in sorted(med.items(), key=lambda kv: (not kv[0][0].startswith('peer'), kv[0][2],
                                                                   kv[0][1], -kv[1])):
        per_image = v / b  # ratios against the peers' batch-1 forward, per image
        a = f'{zy / per_image:.2f}x' if zy else '-'
        c = f'{ed / per_image:.2f}x' if ed else '-'
        k = (name, mode, b)
        i = f'{statistics.median(ips[k]):.2f}' if k in ips else '-'
        o = f'{statistics.median(e2e[k]):.1f}' if k in e2e else '-'
        print(f'{name:26s} {mode:8s} {b:5d} {v:8.1f} {i:>9s} {o:>8s} {len(rows[k]):5d} {a:>14s} {c:>9s}')
PY
