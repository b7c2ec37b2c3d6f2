"""superweight."""
