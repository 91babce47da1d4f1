"""The pipeline's stages: collect (model -> store), train (store -> SAE), evaluate (SAE on held-out data)."""
