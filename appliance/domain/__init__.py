"""Pure code: no I/O and no asyncio. Imports only appliance.errors and other domain modules."""
