"""The GPU worker: Celery tasks, the render engine, reference fetching and the dispatcher."""
