"""FreshRec: feature-store-backed recommendations (Feast + Redis, FAISS, BERT re-ranker, gRPC)."""

__version__ = "0.1.0"
