"""spinserve.runtime."""
