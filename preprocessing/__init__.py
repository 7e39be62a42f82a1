"""Stage 1: CheXpert-format CSV + JPEGs -> a shared Parquet store of pre-resized images."""
__version__ = "0.1.0"
