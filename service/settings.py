"""Service settings: environment variables ``DEBIAS_*`` (pydantic Settings), overridable by `debias serve` options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from debias.data.intake import DEFAULT_FORMATS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEBIAS_", extra="ignore", protected_namespaces=())

    model_dir: Path = Field(description="Run directory written by 'debias train' (DEBIAS_MODEL_DIR).")
    api_key: SecretStr | None = Field(
        default=None, description="When set (DEBIAS_API_KEY), /v1/* requires this value in the X-API-Key header."
    )
    protect_ops: bool = Field(
        default=False,
        description="With an API key, also require it on /metrics and the API documentation (/docs, /redoc, "
        "/openapi.json) (DEBIAS_PROTECT_OPS=true).",
    )
    audit_dir: Path | None = Field(
        default=None, description="Folder written by 'debias audit', browsed at /audit (DEBIAS_AUDIT_DIR)."
    )
    device: str = Field(default="auto", description="auto, cpu or cuda.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="Forward passes in bfloat16 (auto: on CUDA and on CPUs with AMX/AVX-512-BF16)."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads of the model owner (default: torch's own choice)."
    )
    fit_data: str | None = Field(
        default=None, description="Data to fit the novelty scorer on when RUN_DIR/novelty.pt is missing or stale "
        "(default: the model's training data)."
    )
    fit_where: list[str] = Field(default_factory=list, description="COL=VALUE filters for fit_data.")
    target_fpr: float | None = Field(default=None, gt=0, lt=1, description="Override the stored target FPR.")
    top_k: int = Field(default=5, ge=0, le=64, description="Unusual latent dimensions reported per image.")

    # micro-batching
    max_batch_size: int = Field(default=64, ge=1, le=4096, description="Images per model batch; 1 = no batching.")
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000, description="How long a batch waits for more images.")
    max_queue_images: int = Field(default=4096, ge=1, description="Images waiting for the model before 503.")
    gpu_jpeg: bool = Field(default=True, description="Decode JPEGs on the GPU when scoring on CUDA.")

    # input limits
    max_files: int = Field(default=64, ge=1, description="Files per request.")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="Request body size.")
    max_file_bytes: int = Field(default=16 * 2**20, ge=1, description="Size of one uploaded file.")
    max_pixels: int = Field(default=4096 * 4096, ge=1, description="Width x height of one image (from its header).")
    formats: Annotated[frozenset[str], NoDecode] = Field(
        default=DEFAULT_FORMATS, description="Accepted image formats, Pillow names (DEBIAS_FORMATS=JPEG,PNG)."
    )

    max_decode_pixels: int | None = Field(
        default=None, ge=1,
        description="Pixels (width x height, from the headers) decoding at once across all requests; a request "
        "that finds no room within decode_wait_s gets 503 with Retry-After (default: 2 x max_pixels).",
    )
    decode_wait_s: float = Field(default=10.0, ge=0, le=600, description="How long a request waits for decode room.")
    decode_threads: int = Field(default=2, ge=1, le=64, description="Threads that decode uploads larger than 128x128.")
    body_idle_timeout_s: float = Field(
        default=10.0, gt=0, description="A request body that sends nothing for this long gets 408 and is closed."
    )
    body_timeout_s: float = Field(
        default=120.0, gt=0, description="A request body not complete this long after its headers gets 408."
    )

    drift_window: int = Field(default=1000, ge=1, description="Recent scores compared with the calibration set.")

    @property
    def decode_budget_pixels(self) -> int:
        return self.max_decode_pixels if self.max_decode_pixels is not None else 2 * self.max_pixels

    @model_validator(mode="after")
    def _budget_holds_one_image(self) -> Settings:
        if self.max_decode_pixels is not None and self.max_decode_pixels < self.max_pixels:
            raise ValueError(
                f"DEBIAS_MAX_DECODE_PIXELS ({self.max_decode_pixels}) must be at least DEBIAS_MAX_PIXELS "
                f"({self.max_pixels}), or an accepted image could never be decoded"
            )
        return self

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_no_key(cls, v: SecretStr | None) -> SecretStr | None:
        # DEBIAS_API_KEY= (empty) would otherwise accept an empty header; treat it as "no key configured".
        if v is None or not v.get_secret_value():
            return None
        # HTTP header values arrive as Latin-1 bytes; a key with other characters (é, emoji) could never be sent
        # byte-for-byte alike by every client, so it is refused at start-up instead of never matching.
        key = v.get_secret_value()
        if not all(" " < c < "\x7f" for c in key):
            raise ValueError("DEBIAS_API_KEY must be printable ASCII without spaces (it travels in an HTTP header)")
        return v

    @field_validator("formats", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        if isinstance(v, str):
            v = [s for s in v.replace(",", " ").split() if s]
        return frozenset(str(s).upper() for s in v) if isinstance(v, (list, set, frozenset, tuple)) else v
