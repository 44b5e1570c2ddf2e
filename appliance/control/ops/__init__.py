"""Offline and periodic tools: scheduled jobs, retention, doctor."""
