#!/usr/bin/env bash
# Issue 12, section 3: does augmentation help where a shortcut hides the rare groups? On the cue protocols of
# benchmarks/cue_protocols.py (tint, patch, blur), label-free: no group or cue column is read by any step.
#
#   1. a beta-VAE on the training split and its audit (default options): the rarity of every training row;
#   2. GAN: a conditional GAN (label = gender, the task label) trained on draws by that rarity, 2,000 images;
#   3. CycleGAN within each class, from the common rows to the audit's rarest 10 % of that class, 1,000 images per
#      class, so that the rare look is produced from the common one;
#   4. `debias compare` on each augmented training set with ERM (`none`) and the default (`cluster-errors`).
#
# The share of the ERM -> oracle gap each closes is computed by benchmarks/augment_cue_summary.py against the
# ERM and oracle runs of benchmarks/debias_protocols.sh on the original data (same seeds, paired).
#
#   bash benchmarks/augment_cue_protocols.sh [OUT=bench-out/augcue] [SEEDS=0,1,2] [PROTOCOLS="tint patch blur"]
#
# About 70 min on 1 CPU core (OMP_NUM_THREADS=1). Finished steps are reused, so an interrupted run continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/augcue}
CUES=${CUES:-bench-out/cues}
SEEDS=${SEEDS:-0,1,2}
PROTOCOLS=${PROTOCOLS:-"tint patch blur"}
DEBIAS=${DEBIAS:-.venv/bin/debias}
GAN_EPOCHS=${GAN_EPOCHS:-15}
CYCLE_EPOCHS=${CYCLE_EPOCHS:-3}
ESTIMATOR=${ESTIMATOR:-histogram}  # the audit's rarity: the paper's histogram product (the default when this was run)

for p in $PROTOCOLS; do
  data="$CUES/$p/manifest.csv"
  [ -f "$data" ] || .venv/bin/python benchmarks/cue_protocols.py --out "$CUES" --only "$p"
  o="$OUT/$p"
  mkdir -p "$o"
  echo "== $p $(date +%T)"
  [ -f "$o/vae/model.pt" ] || "$DEBIAS" train --data "$data" --where split=train --image-size 32 --latent-dim 16 \
      --epochs 8 --out "$o/vae" --quiet > /dev/null
  [ -f "$o/audit/scores.parquet" ] || "$DEBIAS" audit --model "$o/vae" --data "$data" --where split=train \
      --estimator "$ESTIMATOR" --out "$o/audit" --no-report --quiet > /dev/null
  echo "   audit done $(date +%T)"
  [ -f "$o/gan/combined.csv" ] || "$DEBIAS" augment --method gan --data "$data" --where split=train --label gender \
      --weights "$o/audit/scores.parquet" --n 2000 --image-size 32 --epochs "$GAN_EPOCHS" --out "$o/gan" \
      --merge-with "$data" --quiet > /dev/null
  echo "   gan done $(date +%T)"
  prev="$data"
  for g in female male; do
    [ -f "$o/cyclegan_$g/combined.csv" ] || "$DEBIAS" augment --method cyclegan --data "$data" --where split=train \
        --where gender=$g --weights "$o/audit/scores.parquet" --from common --to rare --rare-quantile 0.1 \
        --label gender --n 1000 --image-size 32 --epochs "$CYCLE_EPOCHS" --width 16 --n-blocks 3 --batch-size 16 \
        --out "$o/cyclegan_$g" --merge-with "$prev" --quiet > /dev/null
    prev="$o/cyclegan_$g/combined.csv"
  done
  echo "   cyclegan done $(date +%T)"
  for aug in gan cyclegan_male; do
    name=${aug%_male}
    [ -f "$o/compare_$name/comparison.json" ] || "$DEBIAS" compare --data "$o/$aug/combined.csv" --label gender \
        --where split=train --eval-where split=test --eval-groups cue,gender --image-size 32 --width 16 --epochs 8 \
        --seeds "$SEEDS" --methods none,cluster-errors --quiet --out "$o/compare_$name" > /dev/null
    echo "   compare $name done $(date +%T)"
  done
done
.venv/bin/python benchmarks/augment_cue_summary.py --out "$OUT" --baseline bench-out/debias
