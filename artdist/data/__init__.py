"""Data stage: label files -> catalog -> WebDataset shards + manifest -> batches."""
