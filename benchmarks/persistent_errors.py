"""Issue 12 attempt: JTT on a first model's *persistent* errors, against the stored 5-seed runs of the cue protocols.

A plain first model is trained for E1 epochs (default 4); after each epoch its errors on the training and validation
rows are recorded. The error set is the rows it gets wrong at *every* epoch from the second on: a shortcut's
exceptions stay wrong while the model learns, hard rows come and go. A fresh model is trained 8 epochs on draws with
the error set upsampled as JTT does ((1 - e) / e), its epoch chosen by validation accuracy weighted the same way.
Label-free: the label and the first model only. Group columns are read for the evaluation only.

    OMP_NUM_THREADS=1 python benchmarks/persistent_errors.py blur,tint,patch,natural 0,1,2,3,4 4 [ROWS.jsonl]

A fourth argument appends every row as a JSON line to that file (for benchmarks/debias_frontier.py).

Needs the protocols (benchmarks/cue_protocols.py) in bench-out/debias/cues/ and the stored runs of
benchmarks/debias_protocols.sh in bench-out/debias/PROTOCOL/runs/ (ERM, oracle, JTT, cluster-errors), to which it
compares by seed. Models go to /tmp/pjtt/.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from debias.data import load_images
from debias.data.splits import validation_split
from debias.data.tensors import ImageTensor
from debias.training.classifier import (
    ClassifierTrainConfig,
    predict_proba,
    train_classifier,
)
from debias.training.sampling import Fixed, Uniform, jtt_upweight_auto, jtt_weights
from debias.training.vae import encode_labels, vae_config

E1 = int(sys.argv[3]) if len(sys.argv) > 3 else 4
class Recorder(Uniform):
    def __init__(self, n, sets):
        super().__init__(n); self.sets, self.errs = sets, {k: [] for k in sets}
    def weights(self, epoch, model):
        if epoch > 0: self.record(model)
        return super().weights(epoch, model)
    def record(self, model):
        for k, (imgs, y) in self.sets.items():
            self.errs[k].append(predict_proba(model, imgs).argmax(1) != y)

def weights(pers):
    return jtt_weights(pers, jtt_upweight_auto(pers)) if pers.any() else np.ones(len(pers))

out_rows = []
for proto in sys.argv[1].split(","):
    man = f"bench-out/debias/cues/{proto}/manifest.csv"
    data = load_images(man, where=["split=train"], image_size=32, progress=False)
    test = load_images(man, where=["split=test"], image_size=32, progress=False)
    y, classes = encode_labels(data.table["gender"])
    yt, _ = encode_labels(test.table["gender"], classes)
    if proto == "natural":
        gcol = (test.table["race"] + " x " + test.table["gender"]).to_numpy(); rcol = test.table["race"].to_numpy()
    else:
        gcol = test.table["group"].to_numpy(); rcol = None
    for seed in map(int, sys.argv[2].split(",")):
        fit, val = validation_split(y, 0.1, seed)
        tr, va, te = ImageTensor(data, fit), ImageTensor(data, val), ImageTensor(test)
        cfg = vae_config(image_size=32, channels=3, latent_dim=32, beta=1.0, width=16, n_classes=2, classes=classes, vae_class=None)
        base = Path(f"/tmp/pjtt/{proto}/s{seed}")
        rec = Recorder(len(fit), {"fit": (tr, y[fit]), "val": (va, y[val])})
        first = train_classifier(cfg, ClassifierTrainConfig(epochs=E1, seed=seed, select="last"), tr, y[fit], rec,
                                 base / "stage1", meta={"m": "s1"}, progress=False)
        rec.record(first.model)
        pf = np.array(rec.errs["fit"])[1:E1].all(0)  # wrong at every epoch from 2 to E1
        pv = np.array(rec.errs["val"])[1:E1].all(0)
        w, wv = weights(pf), weights(pv)
        second = train_classifier(cfg, ClassifierTrainConfig(epochs=8, seed=seed), tr, y[fit], Fixed("pjtt", w),
                                  base / "second", val=va, y_val=y[val], val_weights=wv, meta={"m": "pjtt"}, progress=False)
        pred = predict_proba(second.model, te).argmax(1)
        ok = pd.Series(pred == yt)
        worst = ok.groupby(gcol).mean().min()
        wrace = ok.groupby(rcol).mean().min() if rcol is not None else float("nan")
        ref = {}
        for m in ("none", "oracle", "jtt", "cluster-errors"):
            mm = json.loads(Path(f"bench-out/debias/{proto}/runs/{m}/seed{seed}/metrics.json").read_text())
            ref[m] = (mm["worst_group_accuracy"], mm["accuracy"])
        gap = lambda v: (v - ref["none"][0]) / (ref["oracle"][0] - ref["none"][0])
        row = dict(proto=proto, seed=seed, acc=ok.mean(), worst=worst, worst_race=wrace, gap=gap(worst),
                   gap_jtt=gap(ref["jtt"][0]), gap_ce=gap(ref["cluster-errors"][0]), acc_none=ref["none"][1],
                   acc_ce=ref["cluster-errors"][1], n_err=int(pf.sum()), ess=float(1 / ((w / w.sum()) ** 2).sum() / len(w)))
        out_rows.append(row)
        if len(sys.argv) > 4:
            with open(sys.argv[4], "a") as f:
                f.write(json.dumps({"protocol": proto, "variant": "jtt on persistent errors", "seed": seed,
                                    "accuracy": float(ok.mean()), "worst": float(worst)}) + "\n")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
df = pd.DataFrame(out_rows)
print(df.groupby("proto")[["acc", "worst", "gap", "gap_jtt", "gap_ce", "acc_none", "acc_ce", "ess"]].mean().round(3).to_string())
