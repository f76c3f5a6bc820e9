"""Datasets: load a dataset reference (local folder, file, hub id or mapping) and cache
preprocessed evaluation images.

- :func:`load_dataset_ref` turns what a config names into a ``datasets.Dataset`` (or ``DatasetDict``).
- :func:`dataset_fingerprint` is a stable identity of a dataset's content (used as a cache key).
- :func:`fusion_bench.data.images.preprocessed_images` decodes and preprocesses an image dataset once
  and caches the tensors on disk and in memory.
"""

from fusion_bench.data.loading import (
    dataset_fingerprint,
    default_cache_dir,
    find_image_column,
    find_label_column,
    load_dataset_ref,
)

__all__ = ["dataset_fingerprint", "default_cache_dir", "find_image_column", "find_label_column",
           "load_dataset_ref"]
