"""autointerp: explain, score and causally verify the features of transformer language models."""

__version__ = "0.1.0"
