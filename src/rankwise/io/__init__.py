"""Reading what the user hands in: models, data files and formats, quantization."""
