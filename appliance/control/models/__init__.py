"""The model cache: the registry, warms from a directory or S3, the cache folders, the gate replicas wait at, declared models, model folders' files."""
