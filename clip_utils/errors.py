"""The errors a user can fix, told apart from bugs.

Everything the package raises for a problem the user can act on (a missing model, dataset
or checkpoint, a damaged file, a bad value) is a `UserError`: the command line prints it as
one `error:` line and exits 1. Any other exception (a bug of ours, or a library's error we
did not foresee) keeps its traceback, so it can be reported and fixed.

The subclasses also derive from the built-in error they refine, so code that catches
`ValueError` or `FileNotFoundError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message says what happened and the way out."""


class InvalidValue(UserError, ValueError):
    """A value, option or file content that cannot be used as given."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the run needs is not there (a model, a dataset, a checkpoint)."""


class Refused(UserError, FileExistsError):
    """The run would overwrite or mix something it must not touch."""
