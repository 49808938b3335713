"""simplenn-serve: serve a PyTorch state_dict over REST with dynamic batching and hot reload."""

__version__ = "0.1.0"
