"""Models: what differs per VLM family, the tiny models, loading, vision features, value heads, critics, sharding."""
