"""Reading models: checkpoints, families, the model spec, blocks and their layouts, functional ops,
built-in shapes."""
