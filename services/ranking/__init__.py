"""services/ranking."""
