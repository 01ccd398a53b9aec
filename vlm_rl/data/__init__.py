"""Data: every dataset format read into one normal form, the synthetic datasets, validation."""
