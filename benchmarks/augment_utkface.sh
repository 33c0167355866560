#!/usr/bin/env bash
# Issue 5 acceptance: the UTKFace gender task (the reweighting issue's protocol) on the original training rows, and on
# the original rows plus GAN-generated or CycleGAN-translated black training faces, each with and without
# --reweight dbvae, 5 seeds. Only training rows are generated from or added to; the balanced test split is untouched.
#   bash benchmarks/augment_utkface.sh augment   # the two synthetic sets + their quality pages
#   bash benchmarks/augment_utkface.sh compare   # the three comparisons (original, +GAN, +CycleGAN)
set -euo pipefail
STEP=${1:?augment or compare}
OUT=${OUT:-bench-out/aug}
UTK=${UTK:-../shared/data/utkface/manifest.csv}
DEBIAS=${DEBIAS:-.venv/bin/debias}
FEATURES=${FEATURES:-bench-out/utk_s32_l16_b4.0}  # a VAE trained on the UTKFace train split (docs/benchmarks.md, issue 2)

if [ "$STEP" = augment ]; then
    $DEBIAS augment --method gan --data "$UTK" --where split=train --where race=black --label gender --n 1000 \
        --image-size 32 --epochs 1000 --out "$OUT/gan_black" --merge-with "$UTK" --features "$FEATURES" --quiet
    $DEBIAS augment --method cyclegan --data "$UTK" --where split=train --domain-column race --from white --to black \
        --label gender --n 1000 --image-size 32 --epochs 4 --width 16 --n-blocks 3 --batch-size 16 \
        --out "$OUT/cyclegan_white_black" --merge-with "$UTK" --features "$FEATURES" --quiet
elif [ "$STEP" = compare ]; then
    COMMON=(--label gender --where split=train --eval-where split=test --eval-groups race,gender --image-size 32
            --width 16 --epochs 8 --methods none,dbvae --seeds 0,1,2,3,4 --quiet)
    $DEBIAS compare --data "$UTK" "${COMMON[@]}" --out "$OUT/compare_original"
    $DEBIAS compare --data "$OUT/cyclegan_white_black/combined.csv" "${COMMON[@]}" --out "$OUT/compare_cyclegan"
    $DEBIAS compare --data "$OUT/gan_black/combined.csv" "${COMMON[@]}" --out "$OUT/compare_gan"
else
    echo "usage: $0 augment|compare" >&2; exit 2
fi
