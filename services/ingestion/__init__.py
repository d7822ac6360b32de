"""Event ingestion: validate, de-duplicate, append to the offline store, update online profiles."""
