#!/usr/bin/env bash
# Every GPU figure of docs/performance.md ("GPU") on a machine with CUDA, one step per call:
#
#   bash bench/gpu.sh OUT_DIR [STEP ...]      steps: info slide tests extraction compile mil pixel (default: all)
#
# Each step writes its table or JSON under OUT_DIR and its log to OUT_DIR/STEP.log. Steps are ordered by what
# they need: "slide" makes the 122,880 px benchmark slide (about 9,000 tissue tiles at 20x, so the 20,000-tile
# runs repeat each tile about twice, far apart, which keeps the per-worker JPEG cache from flattering the
# loader), "extraction" and "compile" read it. Each step fits in a few minutes on one H100 with 16 cores.
# PYTHON picks the interpreter (default: python3); it needs the project's dependencies (pyproject.toml).
# SMOKE=1 DEVICE=cpu runs every step at toy sizes, to check the script itself on a machine without a GPU.
# BLOCKS, TILES, REPEATS and BAGS override the sizes, to fit a short lease (a smaller slide repeats each tile more).
set -euo pipefail

out=${1:?usage: bash bench/gpu.sh OUT_DIR [info slide tests extraction compile mil pixel]}
shift
steps=${*:-info slide tests extraction compile mil pixel}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
cd "$(dirname "$0")"
export PYTHONPATH=$PWD/../workflow${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}
cores=$(nproc)
workers="$((cores / 2)) $((cores * 3 / 4)) $((cores - 1))"
if [[ ${SMOKE:-0} == 1 ]]; then
    blocks=2 tiles=64 batch=16 repeats=1 bags=4 bag_tiles=200 pixel_batch=4 pixel_px=64 workers=1
else
    blocks=30 tiles=20000 batch=256 repeats=3 bags=270 bag_tiles=9000 pixel_batch=256 pixel_px=224
fi
blocks=${BLOCKS:-$blocks} tiles=${TILES:-$tiles} repeats=${REPEATS:-$repeats} bags=${BAGS:-$bags}
slide=/tmp/slidemil-bench/gpu-$((blocks * 4096)).tiff

for step in $steps; do
    echo "== $step $(date -u +%H:%M:%S)"
    case $step in
        info)
            { nvidia-smi || true; lscpu | grep -E "Model name|^CPU\(s\)"; "$py" -c "import torch, cv2, openslide
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')
print('opencv', cv2.__version__, 'openslide', openslide.__library_version__)"; } > "$out/info.txt" 2>&1 ;;
        slide)
            "$py" _common.py "$slide" --blocks $blocks > "$out/slide.log" 2>&1 ;;
        tests)
            "$py" -m pytest ../tests/test_cuda.py -q -p no:cacheprovider > "$out/tests.txt" 2>&1 ;;
        extraction)
            # fp16 autocast (auto on CUDA), the loader on cores/2 .. cores-1 workers
            "$py" extraction.py --slide "$slide" --device $dev --extractors resnet50_trunc shufflenet_v2 \
                --tiles $tiles --batch-size $batch --workers $workers --threads 4 --repeats $repeats --loader \
                --json "$out/extraction.json" > "$out/extraction.log" 2>&1 ;;
        compile)
            "$py" extraction.py --slide "$slide" --device $dev --extractors resnet50_trunc --tiles $tiles \
                --batch-size $batch --workers ${workers##* } --threads 4 --repeats $repeats --compile \
                --json "$out/compile.json" > "$out/compile.log" 2>&1 ;;
        mil)
            # CAMELYON-16 scale; TransMIL's 270 bags take the most time
            "$py" mil_models.py --bags $bags --tiles $bag_tiles --device $dev --epochs 2 > "$out/mil.md" 2> "$out/mil.log" ;;
        pixel)
            "$py" pixel_training.py --device $dev --batch-size $pixel_batch --input-px $pixel_px --precision auto fp32 \
                > "$out/pixel.md" 2> "$out/pixel.log" ;;
        *)
            echo "unknown step $step (info slide tests extraction compile mil pixel)" >&2; exit 2 ;;
    esac
done
echo "== done $(date -u +%H:%M:%S)"
