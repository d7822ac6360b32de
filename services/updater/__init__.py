"""services/updater."""
