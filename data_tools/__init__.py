"""vdm-shard: captioned GIF / video folders and WebDataset video shards -> vdm training shards (format v1)."""
