"""Updater service: incremental fine-tuning, champion/challenger gate, publish, rollback."""
