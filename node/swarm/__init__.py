"""Swarm: models in the DHT (catalog), the piece picker, the fetcher, the piece server, the service."""
