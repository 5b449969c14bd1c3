"""faultline: guest memory faults the host cannot resolve, ended cleanly."""

__version__ = "0.1.0"
