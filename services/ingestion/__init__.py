"""services/ingestion."""
