"""Event ingestion: validation, pseudonymisation at the door, storage, features, signals."""
