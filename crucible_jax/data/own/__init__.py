"""Your own data: a JSONL/CSV manifest or WebDataset tar shards, preprocessed per modality, read through grain.

`data.name = "own"` (data/registry.py). The config and its checks (`config`) load without grain or PIL; the
records (`records`), preprocessing (`preprocess`) and the grain source (`source`) load where data is read.
"""
