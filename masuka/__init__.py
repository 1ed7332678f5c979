"""MASUKA: an image studio for FLUX.1 with LoRAs."""

__version__ = "2.0.0"
