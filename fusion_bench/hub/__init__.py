"""Hub experiments: FusionBench's published models, datasets and evaluation protocols, as tables
that the shipped configs are generated from (``python -m fusion_bench.hub.write_configs``)."""
