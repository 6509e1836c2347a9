"""fgjax: fast fine-grained visual recognition in JAX (impostor networks and friends)."""

__version__ = "0.1.0"
