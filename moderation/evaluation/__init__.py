"""Retrieval quality on a golden set: queries with the uploads relevant to each, and runs
that measure recall, precision and MRR through the search service, per query modality."""
