"""The audit chain's rules and its export, readable without a database."""
