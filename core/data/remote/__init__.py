"""Photos and labels away from disk: S3, the bucket index, WebDataset shards (packing, stores, streaming)."""
