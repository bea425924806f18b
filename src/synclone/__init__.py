"""synclone."""
