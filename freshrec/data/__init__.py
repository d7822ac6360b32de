"""freshrec/data."""
