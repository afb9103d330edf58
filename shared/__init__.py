"""What producers and workers agree on: schemas, settings, keys, storage, routing, errors."""
