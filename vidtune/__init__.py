"""vidtune: distributed hyperparameter search for video action-recognition recipes."""

__version__ = "0.1.0"
