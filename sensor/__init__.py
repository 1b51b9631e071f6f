"""purge-sensor: passive network sensor that finds hosts still running Kaspersky products."""

__version__ = "0.1.0"
