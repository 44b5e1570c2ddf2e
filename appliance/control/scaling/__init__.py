"""Autoscaling: the evaluation job and the signals it reads."""
