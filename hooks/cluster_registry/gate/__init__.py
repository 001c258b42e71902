"""The registry write gate: a streaming reverse proxy in front of distribution (see ``protocol``)."""
