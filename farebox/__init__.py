"""farebox: a cost-aware LLM job pipeline over RabbitMQ and Redis."""

__version__ = "0.1.0"
