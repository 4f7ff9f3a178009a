"""Graph passes: capture a model, annotate its nodes, coarsen into blocks, split into stages."""
