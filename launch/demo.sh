#!/usr/bin/env bash
# The whole pipeline on an embedded default: GIFs with captions -> shards with BERT embeddings ->
# 2-rank DeepSpeed training (bf16, ZeRO 2) -> consolidated safetensors -> sampled GIF/MP4 with CFG.
#   bash launch/demo.sh [OUT_DIR]          (make demo runs this inside the project's virtualenv)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo_out}
export HF_HUB_OFFLINE=1
start=$(date +%s)
rm -rf "$out"

echo "== 1/5 writing the demo dataset: GIFs with captions in $out/gifs"
python -m data_tools.demo_data "$out/gifs" --n 320

echo "== 2/5 sharding with vdm-shard (frames, captions, MiniLM BERT embeddings) into $out/shards"
vdm-shard "$out/gifs" "$out/shards" --frames 8 --size 32 --shard-size 40 --workers 2

echo "== 3/5 training with vdm-train on 2 ranks (DeepSpeed, bf16, ZeRO 2)"
NPROC=2 MASTER_PORT=${MASTER_PORT:-29511} launch/single_node.sh configs/demo.yaml \
  data.shards="$out/shards" train.output_dir="$out/run"

echo "== 4/5 consolidating the sharded checkpoint with vdm-consolidate"
vdm-consolidate "$out/run" --out "$out/model"

echo "== 5/5 sampling with vdm-sample (DPM-Solver++, classifier-free guidance)"
vdm-sample "$out/model" --prompt "a red circle moving left" --prompt "a blue square moving up" \
  --prompt "a yellow triangle moving right" --cond-scale 3 --steps 20 --format gif --format mp4 \
  --out "$out/samples" --no-progress

echo "== reading the samples back with the checker (data_tools/shape_checker.py)"
checker=$(python -m data_tools.shape_checker "$out/samples")
echo "$checker"

echo
echo "demo finished in $(( $(date +%s) - start ))s"
echo "  dataset      $out/gifs"
echo "  shards       $out/shards (manifest: $out/shards/manifest.json)"
echo "  checkpoints  $out/run/checkpoints   TensorBoard: tensorboard --logdir $out/run/tb"
echo "  weights      $out/model/model.safetensors + model_config.json"
echo "  samples      $out/samples (index: $out/samples/samples.json)"
echo "  $(echo "$checker" | tail -n 1)"
