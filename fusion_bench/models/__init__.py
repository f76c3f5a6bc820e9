"""nn.Modules that methods build: ensembles, classifiers, merged-weight wrappers, MoE layers."""
