"""Who is asking: API tokens, roles, and the local identity of the CLI."""
