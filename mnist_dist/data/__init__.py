"""MNIST: the IDX format, where the data come from (bundled in this package by default), and batches."""
