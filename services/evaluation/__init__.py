"""Offline evaluation: the chronological replay that compares update strategies (`replay`)."""
