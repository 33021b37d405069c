"""segohem: semantic-segmentation training built around pixel-level online hard example mining."""

__version__ = "0.1.0"
