"""Which adapter applies to which rows: per-row routing (segment path)."""
