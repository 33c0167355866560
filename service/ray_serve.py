"""The novelty service as a Ray Serve deployment: the same FastAPI app (``create_app``) behind ``serve.ingress``, with
the model batches formed by a ``@serve.batch`` method of the deployment instead of the engine's batcher thread.

Each replica builds its own app, and so its own ScoringEngine, in ``__init__``, giving the engine the replica's
batch method as its way to the model (the ``submit`` seam in service/engine.py). The app is therefore bound late
(``__serve_build_asgi_app__``) rather than passed to ``serve.ingress(app)`` at import time: an app made at import
time would be one object shared by the class, and its engine could not reach the replica's batch method. Batching
sits on a plain method, not on a FastAPI route: Serve's batching stacked on a route does not work.

Imported only by `debias serve --engine ray` (pipelines/ray_serve.py); Ray is an optional extra.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi import FastAPI
from ray import serve

from debias.service.app import create_app
from debias.service.engine import ScoringEngine
from debias.service.settings import Settings


def _images_in(payloads: list[Any]) -> int:
    """``batch_size_fn``: a batch is counted in images, as the thread batcher counts it, not in requests."""
    return sum(len(p.images) for p in payloads)


@serve.ingress()
class ScoringDeployment:
    def __init__(self, settings: Settings) -> None:
        # (not `self.app`: Serve's ASGI wrapper has a read-only property of that name)
        self.fastapi: FastAPI = create_app(settings, submit=self._submit)
        self.engine: ScoringEngine = self.fastapi.state.engine
        # The same knobs as the thread batcher: --max-batch-size images, --max-wait-ms.
        self.max_batch_size = settings.max_batch_size
        self._score_batch.set_max_batch_size(settings.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(settings.max_wait_ms / 1000.0)
        # One model call at a time per replica, as with the thread batcher: a large request scored directly must not
        # run beside a batch (two model calls would fight over the same cores or GPU memory).
        self._model_lock = threading.Lock()

    def _process(self, payloads: list[Any]) -> list[Any]:
        with self._model_lock:
            return self.engine.process_batch(payloads)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.fastapi  # Serve runs its lifespan (the engine starts loading the model) and routes requests to it

    async def _submit(self, payload: Any, n_images: int) -> Any:
        if n_images > self.max_batch_size:
            # A request that fills batches on its own gains nothing from waiting (and Serve refuses an item bigger
            # than max_batch_size); process_batch cuts it into model batches itself.
            (result,) = await asyncio.to_thread(self._process, [payload])
        else:
            result = await self._score_batch(payload)
        if isinstance(result, BaseException):  # one bad payload fails only its own request
            raise result
        return result

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, batch_size_fn=_images_in)
    async def _score_batch(self, payloads: list[Any]) -> list[Any]:
        # The model runs in a worker thread so the replica's event loop keeps taking requests (the next batch).
        return await asyncio.to_thread(self._process, payloads)


def build(settings: Settings, replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0) -> Any:
    """The bound application for ``serve.run``: ``replicas`` copies, each with its own model on ``gpus_per_replica``
    of a GPU when given (device "auto" then finds CUDA in the replica)."""
    options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica > 0:
        options["num_gpus"] = gpus_per_replica
    deployment = serve.deployment(ScoringDeployment, name="debias", num_replicas=replicas, ray_actor_options=options)
    return deployment.bind(settings)
