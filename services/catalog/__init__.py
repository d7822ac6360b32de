"""Catalogue changes: validate, write to online features and the offline log, fan out to replicas."""
