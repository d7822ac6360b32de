"""Ranking service: Recommend and LogEvents over gRPC, hot-swapping model versions."""
