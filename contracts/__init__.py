"""The messages on the wire (CONTRACT.md §2–§7) as strict pydantic models, nothing else."""

# The version of CONTRACT.md this code implements; the published AsyncAPI document carries it as info.version.
CONTRACT_VERSION = "1.1"
