"""Rows of an ImageSet as float tensors for training: held in memory as uint8 when they fit, else read per batch."""

from __future__ import annotations

import numpy as np
import torch

from debias.data.imageset import ImageSet

_IN_MEMORY_LIMIT = 4 << 30  # bytes of uint8 pixels held in RAM; larger sets are read from the memmap per batch


class ImageTensor:
    """Some rows of an ImageSet, indexable by position. Held in memory as one uint8 (N, H, W, C) tensor when that
    fits (a quarter of the float size; gathering a batch is then one indexing op instead of memmap reads)."""

    def __init__(self, data: ImageSet, rows: np.ndarray | None = None) -> None:
        self.rows = np.arange(len(data)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._data = data
        self._u8: torch.Tensor | None = None
        if len(self.rows) * data.image_size**2 * data.channels <= _IN_MEMORY_LIMIT:
            self._u8 = torch.from_numpy(np.ascontiguousarray(data.images[self.rows]))

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self) -> np.ndarray:
        """uint8 (N, H, W, C) of all rows (a view when they are held in memory)."""
        if self._u8 is not None:
            return self._u8.numpy()
        return np.asarray(self._data.images[self.rows])

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        """float32 (B, C, H, W) in [0, 1] for positions ``idx``, in channels_last memory format (NHWC underneath,
        as the cache stores the pixels, so no copy is needed to get there)."""
        if self._u8 is not None:
            x = self._u8[torch.as_tensor(idx, dtype=torch.long)].permute(0, 3, 1, 2)
        else:
            x = torch.from_numpy(np.ascontiguousarray(self._data.images[self.rows[np.asarray(idx)]])).permute(0, 3, 1, 2)
        return x.float().div_(255.0)
