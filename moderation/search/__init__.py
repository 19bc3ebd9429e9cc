"""The analyst's similarity index over every screened upload (see `follow.py` for how it
tracks the embeddings table, `indexes.py` for which Faiss index serves which size)."""
