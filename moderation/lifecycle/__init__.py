"""The embedding model lifecycle as operators drive it: adding, activating and retiring
models in the registry (`moderation.embedding.registry`), with what the banks would lose
checked before a model stops being computed."""
