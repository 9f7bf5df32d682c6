"""The one exception type users see: a problem with their input, said in one line with the fix."""


class AntidoteError(Exception):
    """Bad input or an impossible request. The CLI prints the message alone and exits with code 2."""
