"""acceptrace: eBPF tracer of the Linux TCP accept path."""

__version__ = "0.1.0"
