#!/usr/bin/env bash
# The debiasing benchmark of issue 12: every method against ERM and the group-balanced oracle on four cue protocols
# and the natural-UTKFace control, 5 seeds each, 32 px, width 16. Writes OUT/PROTOCOL/comparison.{md,json} and
# groups_*.png (each method's share of the ERM -> oracle worst-group gap is in all three).
#
#   [OUT=bench-out/debias] [CUES=$OUT/cues] [SEEDS=0,1,2,3,4] [PROTOCOLS="tint patch blur natural spurious"] \
#   [METHODS=none,auto,cluster-errors,lff,rarity,jtt] bash benchmarks/debias_protocols.sh
#
# About 70 min on 2 CPU cores. Finished runs are reused, so an interrupted benchmark continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/debias}
CUES=${CUES:-$OUT/cues}  # the protocols' images (another OUT can reuse them: the data path is part of each run's options)
SEEDS=${SEEDS:-0,1,2,3,4}
PROTOCOLS=${PROTOCOLS:-"tint patch blur natural spurious"}
METHODS=${METHODS:-none,auto,cluster-errors,lff,rarity,jtt}
DEBIAS=${DEBIAS:-.venv/bin/debias}
COMMON=(--label gender --where split=train --eval-where split=test --image-size 32 --width 16 --epochs 8
        --seeds "$SEEDS" --methods "$METHODS" --quiet)

for p in $PROTOCOLS; do
  case $p in
    spurious)  # the built-in set made learnable: 20,000 images (320 off-colour training rows) and 10 epochs
      "$DEBIAS" compare --data "builtin:spurious?n=20000" --label label --where split=train --eval-where split=test \
        --eval-groups colour,label --oracle-groups colour,label --image-size 32 --width 16 --epochs 10 \
        --seeds "$SEEDS" --methods "$METHODS" --quiet --out "$OUT/spurious" > /dev/null ;;
    natural)
      [ -f "$CUES/natural/manifest.csv" ] || .venv/bin/python benchmarks/cue_protocols.py --out "$CUES" --only natural
      "$DEBIAS" compare --data "$CUES/natural/manifest.csv" "${COMMON[@]}" --eval-groups race,gender \
        --oracle-groups race,gender --out "$OUT/natural" > /dev/null ;;
    *)
      [ -f "$CUES/$p/manifest.csv" ] || .venv/bin/python benchmarks/cue_protocols.py --out "$CUES" --only "$p"
      "$DEBIAS" compare --data "$CUES/$p/manifest.csv" "${COMMON[@]}" --eval-groups cue,gender \
        --oracle-groups cue,gender --out "$OUT/$p" > /dev/null ;;
  esac
  echo "== $p: $OUT/$p/comparison.md"
  grep -E "^\| (accuracy|worst .* accuracy|share of the|epoch s|ess fraction|metric) " "$OUT/$p/comparison.md" | head -12
done
