"""Response bodies of the service (they also make the OpenAPI schema that clients and schemathesis read)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TopDim(BaseModel):
    dim: int = Field(description="Latent dimension index.")
    distance_share: float | None = Field(
        default=None, description="This dimension's share of the squared latent distance to the image's nearest "
        "training images (the posterior_knn statistic); the list is ordered by it."
    )
    tail: float = Field(description="Training mass of histogram bins no more likely than this image's bin.")
    value: float = Field(description="The image's posterior mean in this dimension.")


class FileProblem(BaseModel):
    status: int = Field(description="The HTTP status this file alone would get (400, 413, 415 or 422).")
    code: str = Field(description="bad_image, too_large, unsupported_image or not_a_file.")
    reason: str = Field(description="Why this file cannot be scored, in a sentence.")


class ImageScore(BaseModel):
    """One uploaded file: scored (``error`` is null) or not (``error`` says why; the score fields are null)."""

    filename: str
    error: FileProblem | None = Field(default=None, description="Set when this file could not be scored.")
    novelty: float | None = Field(
        default=None,
        description="Fisher combination of the statistics' tail p-values (-2 sum log p); higher = more novel.",
    )
    p_value: float | None = Field(
        default=None, description="Conformal p-value against the calibration images: (1 + #{cal >= s}) / (n + 1)."
    )
    is_novel: bool | None = Field(default=None, description="p_value <= target_fpr.")
    rarity: float | None = Field(default=None, description="Minus the latent-histogram log density (as in `debias audit`).")
    recon_error: float | None = Field(default=None, description="Mean squared error per pixel of the reconstruction.")
    driver: str | None = Field(
        default=None, description="The statistic that drove the novelty score: posterior_knn (the latent distance "
        "to the nearest training images), recon_error (the reconstruction error), pixel_density (how usual the "
        "image's pixel values are at their positions among the training images) or embedding_knn (the distance to "
        "the nearest training images in the contrastive encoder's features, when the run has one)."
    )
    statistics: dict[str, float] = Field(
        default_factory=dict, description="Each statistic's standardised value (training mean 0, sd 1)."
    )
    top_dims: list[TopDim] = Field(
        default_factory=list,
        description="The latent dimensions behind the latent distance, largest share first.",
    )
    heatmap_png: str | None = Field(
        default=None, description="With ?heatmap=true: base64 PNG of input | reconstruction | squared error."
    )


class ModelSummary(BaseModel):
    run: str
    model_sha256: str
    debias_version: str
    target_fpr: float
    threshold: float | None


class ScoreResponse(BaseModel):
    model: ModelSummary
    n_scored: int = Field(description="Files scored.")
    n_failed: int = Field(description="Files that carry an error instead of a score.")
    results: list[ImageScore] = Field(description="One entry per uploaded file, in request order.")


class ModelCard(BaseModel):
    run: str
    model_sha256: str
    debias_version: str
    image_size: int
    channels: int
    latent_dim: int
    trained_on: dict[str, Any]
    fitted_on: dict[str, Any]
    novelty: dict[str, Any]
    calibration_size: int
    target_fpr: float
    threshold: float | None
    fitted_at: str
    device: str
    batching: dict[str, Any]
    limits: dict[str, Any]


class Drift(BaseModel):
    window: int = Field(description="Recent images in the window (at most the configured drift window).")
    target_fpr: float
    n_calibration: int
    fraction_novel: float | None
    ks_statistic: float | None = Field(description="Two-sample Kolmogorov-Smirnov statistic, window vs calibration.")
    ks_p_value: float | None
    binomial_p_value: float | None = Field(description="P(at least this many novel | rate = target_fpr).")
    median_p_value: float | None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    state: str
    error: str | None = None
