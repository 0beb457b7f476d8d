"""Audit stage: per-sample outlier scores, their ranking, the passes over a split, the report files."""
