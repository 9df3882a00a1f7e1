"""Data for training and evaluation: local records through `datasets`, packing, chat masking, batches."""
