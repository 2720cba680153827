"""Request-level machinery: sampling (and, with the engine, scheduling and paged KV)."""
