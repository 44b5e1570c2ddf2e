"""The OpenAI-compatible gateway: who calls, admission, relaying to workers, usage and renaming in answers."""
