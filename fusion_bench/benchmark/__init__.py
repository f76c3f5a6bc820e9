"""The offline benchmark: image-classification tasks, a small CLIP, its fine-tuned zoo and leaderboards."""
