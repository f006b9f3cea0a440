"""The one exception type of the data package."""


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file or key and what to do about it."""
