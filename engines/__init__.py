"""spinserve.engines."""
