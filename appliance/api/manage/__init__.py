"""The admin API: endpoints, replicas, keys and tokens, service accounts, autoscaling, models, validation, residency, and their views."""
