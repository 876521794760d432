"""(placeholder package, filled in below)."""
