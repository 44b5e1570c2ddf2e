"""The `appliance` command: one module per command group."""
