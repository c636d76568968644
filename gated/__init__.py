"""gated: turnstile and ticket-reader daemon."""

__version__ = "0.1.0"
