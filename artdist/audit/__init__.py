"""The dataset audit: K-fold out-of-sample scores of every painting (plan, fold runs, merge, peer benchmark)."""
