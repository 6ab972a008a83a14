"""stora-gateway: the edge agent that drives a self-storage site's locks for Stora."""

__version__ = "0.1.0"
