"""Logs, per-chunk metrics and the run report."""
