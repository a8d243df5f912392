"""Errors a user can fix. The CLI prints their message without a traceback."""


class MliltError(Exception):
    """Base class: the message says what is wrong, where, and what was expected."""

    exit_code = 1


class UsageError(MliltError):
    """The command line or the arguments of an API call are wrong."""

    exit_code = 2


class DataError(MliltError):
    """A data file (captions, images) is malformed; the message names file and line."""

    exit_code = 3


class PackError(MliltError):
    """A language pack is malformed, incomplete, or made for other towers."""

    exit_code = 4


class TowerLoadError(MliltError):
    """A tower id that could not be turned into a tower, or whose files changed under it."""
