"""Keys, tokens, OAuth2 accounts, the vault, TLS and usage accounting."""
