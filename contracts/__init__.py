"""The messages on the wire (CONTRACT.md §2–§7) as strict pydantic models, nothing else."""
