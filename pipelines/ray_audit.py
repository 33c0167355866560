"""`debias audit --engine ray`: the audit's decode and encode stages as a Ray Data pipeline, on a local Ray or a cluster.

    rows of the source (listed and --where-filtered on the driver, exactly as the local engine lists them)
      -> ray.data.range(n)                          one row per position in the filtered table
      -> map_batches(_decode_rows)                  tasks: the data layer's own row loader (debias.data), so pixels
                                                    and skip reasons are those the local engine's cache would hold
      -> map_batches(_Encoder, ActorPoolStrategy)   actors, one GPU each when the cluster has GPUs: encode_batch, and
                                                    the run's contrastive encoder's features when the rarity uses them
      -> gathered on the driver, sorted by position -> pipelines.audit.write_audit (density fit, scores, report)

The histogram density is fitted on the driver from the gathered latents with the same code as the local engine
(`write_audit`), so `rarity` and `weight` agree with it up to float rounding of batched kernels. Ray is imported only
here, and only when this engine runs; the library (debias/) never imports it.

On a cluster every node needs debias installed (`pip install "debias[ray]"`) and must be able to read the source's
files under the same paths (a shared file system or object-store mount); builtin:NAME sources need nothing.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from debias.api import load_encoder
from debias.data.cache import load_row
from debias.data.imageset import SourceRows, list_rows
from debias.data.sources import Source
from debias.density.detector import encoder_features
from debias.density.encoding import Encoded, encode_batch
from debias.density.rarity import AUDIT_EMBEDDING_READOUT
from debias.errors import DebiasError
from debias.models import ConvVAE, VAEConfig
from debias.models.contrastive import ContrastiveConfig, ContrastiveEncoder
from debias.pipelines.audit import (
    AuditJob,
    AuditResult,
    EncodedRows,
    check_group_by,
    write_audit,
)
from debias.pipelines.ray_cluster import connect, import_ray
from debias.runtime.device import precision_setting, resolve_device, set_precision
from debias.runtime.progress import progress_bar
from debias.training.vae import load_model


@dataclass
class RayAuditOptions:
    address: str | None = None  # an existing cluster ("auto", "HOST:6379", "ray://HOST:10001"); None: start a local Ray
    actors: int | None = None  # encoder actors (default: one per GPU of the cluster, else one per CPU)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus: int | None = None  # CPUs of a local Ray (default: all of this machine); ignored with an address
    decode_batch_size: int = 256  # rows per decode task


def run_ray_audit(job: AuditJob, opts: RayAuditOptions) -> AuditResult:
    ray = import_ray()
    # The driver keeps a copy of the model for the report (a few reconstructions); the actors get their own, and a
    # copy of the run's contrastive encoder when the rarity reads its features (knn-recon's third term, as the local
    # engine: pipelines.audit.run_embeddings).
    model, meta = load_model(job.model, resolve_device(job.device))
    encoder = load_encoder(job.model, "cpu") if job.use_encoder and job.estimator == "knn-recon" else None
    cfg = model.config
    rows = list_rows(job.data, where=job.where, image_size=cfg.image_size, channels=cfg.channels)
    check_group_by(job, rows.table.columns)

    started = connect(opts.address, opts.num_cpus)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        gpus_per_actor = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
        if gpus_per_actor > gpus:
            raise DebiasError(f"--gpus-per-actor {gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs")
        cpus = int(resources.get("CPU", 1))
        actors = opts.actors or (int(gpus // gpus_per_actor) if gpus_per_actor > 0 else max(1, cpus))
        if gpus_per_actor == 0 and actors > cpus:
            raise DebiasError(f"--actors {actors} but the Ray cluster has {cpus} CPUs (one per CPU actor)")
        t0 = time.perf_counter()
        positions, enc, embeddings, reasons, busy = _encode_on_ray(ray, model, encoder, rows, job, opts, actors,
                                                                   gpus_per_actor)
        seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()

    encoded, skipped = _split(rows, positions, enc, reasons)
    kept_table = rows.table.iloc[encoded]  # original index labels: what the source's loader expects
    loader = rows.source.loader(kept_table, cfg.image_size, rows.channels)

    def pixels(idx: np.ndarray) -> np.ndarray:  # the report's few rows, decoded again here on the driver
        return np.stack([loader(int(i)) for i in np.asarray(idx).reshape(-1)])

    result = EncodedRows(
        table=kept_table.reset_index(drop=True),
        skipped=skipped,
        fingerprint=rows.fingerprint,
        enc=_take(enc, encoded),
        encode_s=seconds,  # decode + encode + transfer: the whole distributed stage
        pixels=pixels,
        embeddings=None if embeddings is None else embeddings[encoded],
        engine={"name": "ray", "actors": actors, "gpus_per_actor": gpus_per_actor, "address": opts.address,
                "decode_and_encode_s": seconds,
                # summed over the workers: images / (decode_s + encode_s) is one worker's steady-state throughput
                "worker_decode_s": busy["decode_s"], "worker_encode_s": busy["encode_s"]},
    )
    return write_audit(job, model, meta, result)


# -- the distributed stage ---------------------------------------------------------------------------------------------
def _encode_on_ray(
    ray: Any, model: ConvVAE, encoder: ContrastiveEncoder | None, rows: SourceRows, job: AuditJob,
    opts: RayAuditOptions, actors: int, gpus_per_actor: float,
) -> tuple[np.ndarray, Encoded, np.ndarray | None, np.ndarray, dict[str, float]]:
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts gathered rows (and Ray need not say it has none)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.print_on_execution_start = False

    n = len(rows.table)
    cfg = model.config
    decoder = RowDecoder(rows.source, rows.table, cfg.image_size, rows.channels)
    # Passed by reference inside a list: every actor fetches one shared copy, and Ray does not treat it as a
    # constructor argument living in the object store (which it warns about for restartable actors).
    weights = [ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})]
    contrastive = None if encoder is None else {
        "config": encoder.config.to_dict(),
        "weights": [ray.put({k: v.detach().cpu() for k, v in encoder.state_dict().items()})],
    }
    # The positions are made into blocks on the driver (from_items puts them in the object store, no tasks): a read
    # stage would need CPUs of its own, which a fixed actor pool holding every CPU of a small cluster never frees.
    # At least two blocks per actor so that every actor gets work even on a small source.
    blocks = min(n, max(2 * actors, -(-n // opts.decode_batch_size)))
    ds = ray.data.from_items([{"pos": i} for i in range(n)], override_num_blocks=blocks)
    # Same resources as the encoder on CPU, so Ray Data fuses the two stages into the actors (decode then encode in
    # one process, no pixels through the object store); with GPU actors they stay apart and decode runs as CPU tasks.
    ds = ds.map_batches(_decode_rows, fn_kwargs={"decoder": decoder}, batch_size=opts.decode_batch_size,
                        batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(
        _Encoder,
        fn_constructor_kwargs={"config": cfg.to_dict(), "weights": weights, "use_gpu": gpus_per_actor > 0,
                               "contrastive": contrastive, "precision": precision_setting()},
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        num_cpus=1,
    )
    parts: list[dict[str, np.ndarray]] = []
    with progress_bar(f"encoding on Ray ({actors} actors)", total=n, enabled=job.progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(batch)
            bar.advance(len(batch["pos"]))

    def cat(key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in parts])

    order = np.argsort(cat("pos"), kind="stable")
    enc = Encoded(
        mu=cat("mu")[order], logvar=cat("logvar")[order], recon_error=cat("recon_error")[order],
        logits=cat("logits")[order] if "logits" in parts[0] else None,
    )
    embeddings = cat("embedding")[order].astype(np.float64) if encoder is not None else None
    busy = {"decode_s": float(cat("decode_s").sum()), "encode_s": float(cat("encode_s").sum())}
    return cat("pos")[order], enc, embeddings, cat("reason")[order].astype(str), busy


def _split(rows: SourceRows, positions: np.ndarray, enc: Encoded, reasons: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """Positions that were encoded, and the skipped rows as the local engine lists them (path, reason)."""
    if not np.array_equal(positions, np.arange(len(rows.table))):
        raise RuntimeError(f"the Ray pipeline returned {len(positions)} rows for {len(rows.table)}")  # cannot happen
    bad = reasons != ""
    paths = rows.table["path"].tolist()
    skipped = pd.DataFrame(
        {"path": ["" if _isna(paths[i]) else str(paths[i]) for i in np.flatnonzero(bad)], "reason": reasons[bad].tolist()},
        columns=["path", "reason"],
    )
    from debias.data.cache import report_skipped

    report_skipped(skipped)
    if bad.all():
        first = f" (first: {skipped.path[0]}: {skipped.reason[0]})" if len(skipped) else ""
        raise DebiasError(f"none of the {len(bad)} images could be read{first}")
    return np.flatnonzero(~bad), skipped


def _take(enc: Encoded, idx: np.ndarray) -> Encoded:
    return Encoded(mu=enc.mu[idx], logvar=enc.logvar[idx], recon_error=enc.recon_error[idx],
                   logits=enc.logits[idx] if enc.logits is not None else None)


def _isna(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


# -- what runs on the workers (imported there by module path: debias must be installed on every node) -----------------
_LOADERS: dict[str, Callable[[int], np.ndarray]] = {}  # per worker process: build a source's loader once


class RowDecoder:
    """Pickled into every decode task: the source and its filtered rows; the loader (which may read whole idx files)
    is built once per worker process and kept in ``_LOADERS``."""

    def __init__(self, source: Source, table: pd.DataFrame, image_size: int, channels: int) -> None:
        self.source, self.table, self.image_size, self.channels = source, table, image_size, channels
        self.key = uuid.uuid4().hex

    def __call__(self, pos: int) -> tuple[np.ndarray | None, str]:
        loader = _LOADERS.get(self.key)
        if loader is None:
            if len(_LOADERS) > 4:
                _LOADERS.clear()
            loader = _LOADERS[self.key] = self.source.loader(self.table, self.image_size, self.channels)
        return load_row(loader, pos, (self.image_size, self.image_size, self.channels))


def _decode_rows(batch: dict[str, np.ndarray], *, decoder: RowDecoder) -> dict[str, np.ndarray]:
    """Positions -> pixels (zeros where a row cannot be read) and the reason ('' when it could)."""
    t0 = time.perf_counter()
    pos = batch["pos"].astype(np.int64)
    images = np.zeros((len(pos), decoder.image_size, decoder.image_size, decoder.channels), dtype=np.uint8)
    reasons = []
    for k, p in enumerate(pos):
        arr, reason = decoder(int(p))
        if arr is not None:
            images[k] = arr
        reasons.append(reason)
    # Worker seconds, spread over the batch's rows, so the driver can sum them: the per-worker throughput.
    decode_s = np.full(len(pos), (time.perf_counter() - t0) / max(1, len(pos)))
    return {"pos": pos, "image": images, "reason": np.asarray(reasons, dtype=object), "decode_s": decode_s}


class _Encoder:
    """One actor: a copy of the model (on its GPU when it has one) that encodes the decoded rows of each batch, and
    of the contrastive encoder when ``contrastive`` ({"config", "weights"}) is given, whose features it adds."""

    def __init__(self, config: dict[str, Any], weights: list[Any], use_gpu: bool,
                 contrastive: dict[str, Any] | None = None, precision: str = "auto") -> None:
        import ray

        set_precision(precision)  # the driver's --precision: the setting is per process

        state = ray.get(weights[0])
        # Ray gives a GPU actor its own device as cuda:0 (CUDA_VISIBLE_DEVICES); untested here (no GPU).
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model = ConvVAE(VAEConfig(**config))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.encoder = None
        if contrastive is not None:
            self.encoder = ContrastiveEncoder(ContrastiveConfig(**contrastive["config"]))
            self.encoder.load_state_dict(ray.get(contrastive["weights"][0]))
            self.encoder.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        cfg = self.model.config
        n = len(ok)
        # Rows that could not be decoded travel on as NaN so that the driver sees every position exactly once.
        out = {"pos": batch["pos"], "reason": batch["reason"], "mu": np.full((n, cfg.latent_dim), np.nan, dtype=np.float32),
               "logvar": np.full((n, cfg.latent_dim), np.nan, dtype=np.float32), "recon_error": np.full(n, np.nan)}
        if cfg.n_classes:
            out["logits"] = np.full((n, cfg.n_classes), np.nan, dtype=np.float32)
        if self.encoder is not None:
            width = self.encoder.config.feature_dim(AUDIT_EMBEDDING_READOUT)
            out["embedding"] = np.full((n, width), np.nan, dtype=np.float32)
        if ok.any():
            # Exactly ImageSet.batch -> encode_batch, as encode_images does in the local engine.
            x = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2).float().div_(255.0)
            enc, _ = encode_batch(self.model, x)
            out["mu"][ok], out["logvar"][ok], out["recon_error"][ok] = enc.mu, enc.logvar, enc.recon_error
            if enc.logits is not None:
                out["logits"][ok] = enc.logits
            if self.encoder is not None:  # as embed_images does in the local engine
                out["embedding"][ok] = encoder_features(self.encoder, x, AUDIT_EMBEDDING_READOUT)
        out["decode_s"] = batch["decode_s"]
        out["encode_s"] = np.full(n, (time.perf_counter() - t0) / max(1, n))
        return out
