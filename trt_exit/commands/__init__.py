"""CLI command groups; each module adds its subcommands with ``register(subparsers)``."""
