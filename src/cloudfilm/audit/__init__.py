"""The append-only record of every access and change."""
