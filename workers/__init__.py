"""The Celery worker fleet: app configuration, the batched usage consumer, thin tasks."""
