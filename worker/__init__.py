"""The worker: consumes queued messages, asks a model, stores and publishes the replies."""
