"""aiohttp handlers and the application they make up, thin over control."""
