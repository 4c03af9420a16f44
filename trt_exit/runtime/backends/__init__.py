"""Stage runners per backend."""
