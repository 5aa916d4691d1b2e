"""server/: the FastAPI app, OpenAI protocol models, and Prometheus metrics."""
