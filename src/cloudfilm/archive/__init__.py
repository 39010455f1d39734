"""The archive core: the index and the ingest pipeline every door goes through."""
