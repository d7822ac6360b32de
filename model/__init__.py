"""Pure compute: text builders, BERT re-ranker, recall embeddings, FAISS index, training, export.

Imports no Redis, gRPC or Feast; services wire I/O to it.
"""
