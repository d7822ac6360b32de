"""FreshRec services: ranking, updater, ingestion, feature-store access, shared server plumbing."""
