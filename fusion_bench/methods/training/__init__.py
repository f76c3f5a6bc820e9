"""Fine-tuning used to build zoos."""
