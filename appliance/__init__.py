"""appliance: a single-node model-serving appliance."""

__version__ = "0.1.0"
