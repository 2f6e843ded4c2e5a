"""The library's one exception type."""


class FwdTransError(RuntimeError):
    """Raised for every user-facing fwdtrans error; the message names the cause and the fix."""
