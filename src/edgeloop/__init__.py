"""edgeloop: the edge-ML loop of an appliance-monitoring product, self-hosted."""

__version__ = "0.1.0"
