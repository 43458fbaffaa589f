"""A loss-proof HTTP gateway for synchronous image-generation APIs."""

__version__ = "0.1.0"
