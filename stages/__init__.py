"""The pipeline's stages: collect (model -> store), train (store -> SAE), evaluate (SAE on held-out data)."""

__version__ = "0.1.0"
