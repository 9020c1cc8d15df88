"""AV-UIE v2 data: media I/O, the dataset loader and the synthetic-data generator."""
