"""Compatibility front-ends for other merging tools' configuration formats (mergekit)."""
