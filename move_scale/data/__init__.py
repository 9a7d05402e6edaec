"""Shards: writing (`move-shard`), streaming, transforms and synthetic scenes."""
