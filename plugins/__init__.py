"""spinserve.plugins."""
