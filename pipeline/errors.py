"""Errors caused by user input. The command line shows their message, without a traceback."""


class KdmtlError(Exception):
    """A problem the user can fix: bad data, a missing or stale input. The message says how."""


class DataError(KdmtlError):
    """A dataset folder or prepared store that cannot be used as it is."""
