"""spinserve.control."""
