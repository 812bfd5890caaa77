"""Sub-commands of ``mae-transfer``; each module has ``register(subparsers)``."""
