"""Reference solutions of the exercises: each passes ``bnlab learn check``."""
