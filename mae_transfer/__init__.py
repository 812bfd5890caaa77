"""mae-transfer: the command-line application (``mae-transfer``) over the toolkit's packages."""

__version__ = "0.1.0"
