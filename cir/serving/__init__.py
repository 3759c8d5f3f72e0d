"""What the retrieval server checks before a model sees a request (`inputs`)."""
