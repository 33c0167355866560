"""Data layer: read an image SOURCE once into a memory-mapped cache store.

SOURCE is a folder of images, a CSV/Parquet manifest with a ``path`` column, a folder of MNIST-style
idx files, or ``builtin:NAME?param=value`` (see :data:`BUILTIN_DATASETS`).
"""

from debias.data.builtin import BUILTIN_DATASETS
from debias.data.cache import cache_root
from debias.data.decode import ImageDecodeError, decode_image
from debias.data.imageset import ImageSet, load_images

__all__ = ["ImageSet", "load_images", "decode_image", "cache_root", "BUILTIN_DATASETS", "ImageDecodeError"]
