#!/usr/bin/env bash
# Build TensorRT FP16 plans (tensorrt_plan models) for a gpu-flavour repository, inside the pinned
# NVIDIA image, so the plan's TensorRT version is the one the serving Triton loads. A plan built by
# one TensorRT version does not load in another, so never build plans with a local pip TensorRT.
#
#   python -m training export --run runs/digits --repo model_repository --flavor gpu
#   deploy/build-engines.sh model_repository            # needs docker + NVIDIA Container Toolkit
#
# For each model in manifest.json with role teacher/student/variant/multihead it writes
# <repo>/<name>_trt/1/model.plan and <repo>/<name>_trt/config.pbtxt (platform tensorrt_plan).
# NOT RUN on the kdserve development machine (no GPU, no docker engine): see README "What ran here".
set -euo pipefail

TRITON_IMAGE="${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:24.10-py3}"       # Triton 2.51, TensorRT 10.5
TENSORRT_IMAGE="${TENSORRT_IMAGE:-nvcr.io/nvidia/tensorrt:24.10-py3}"       # same release: same TensorRT
MAX_BATCH="${MAX_BATCH:-64}"
OPT_BATCH="${OPT_BATCH:-16}"

repo="${1:?usage: deploy/build-engines.sh <model_repository>}"
repo="$(cd "$repo" && pwd)"
[[ -f "$repo/manifest.json" ]] || { echo "error: $repo/manifest.json not found; export first" >&2; exit 2; }

if [[ "${KDSERVE_IN_CONTAINER:-}" != 1 ]]; then
  # Re-run this script inside the image. trtexec ships in the TensorRT image of the same release as
  # the Triton image; prefer the Triton image when it carries trtexec itself.
  image="$TRITON_IMAGE"
  if ! docker run --rm "$image" bash -c 'command -v trtexec || test -x /usr/src/tensorrt/bin/trtexec' >/dev/null 2>&1; then
    image="$TENSORRT_IMAGE"
  fi
  exec docker run --rm --gpus all -e KDSERVE_IN_CONTAINER=1 -e MAX_BATCH -e OPT_BATCH \
    -v "$repo:/models" -v "$(cd "$(dirname "$0")" && pwd):/deploy:ro" "$image" bash /deploy/build-engines.sh /models
fi

trtexec="$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)"
[[ -x "$trtexec" ]] || { echo "error: trtexec not found in this image" >&2; exit 2; }

python3 - "$repo" <<'PY' | while read -r name size classes shape; do
import json, sys
manifest = json.load(open(f"{sys.argv[1]}/manifest.json"))
for name, m in manifest["models"].items():
    if m["role"] in ("teacher", "student", "variant", "multihead") and m["precision"] == "fp32":
        out = ",".join(str(d) for d in m["output"]["shape"])
        print(name, m["input"]["shape"][0], m["output"]["shape"][-1], out)
PY
  src="$repo/$name/$(ls "$repo/$name" | grep -E '^[0-9]+$' | sort -n | tail -1)/model.onnx"
  dst="$repo/${name}_trt"
  mkdir -p "$dst/1"
  echo "[build-engines] $name: $src -> $dst/1/model.plan (FP16)"
  "$trtexec" --onnx="$src" --fp16 --saveEngine="$dst/1/model.plan" \
    --minShapes=images:1x${size}x${size}x3 --optShapes=images:${OPT_BATCH}x${size}x${size}x3 \
    --maxShapes=images:${MAX_BATCH}x${size}x${size}x3 --skipInference
  # Batching without a queue policy or a delay: in Triton 24.10 (2.51) a queue policy stalls ~5% of
  # requests for ~500 ms and a delay is added to every lone request (training/triton_repo.py).
  cat > "$dst/config.pbtxt" <<CFG
name: "${name}_trt"
platform: "tensorrt_plan"
max_batch_size: ${MAX_BATCH}
input [ { name: "images" data_type: TYPE_UINT8 dims: [ ${size}, ${size}, 3 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ ${shape} ] } ]
dynamic_batching { }
instance_group [ { count: 1 kind: KIND_GPU } ]
CFG
  cp "$repo/$name/labels.txt" "$dst/labels.txt"
done
echo "[build-engines] done; serve with: docker run --gpus all -v $repo:/models $TRITON_IMAGE tritonserver --model-repository=/models"
