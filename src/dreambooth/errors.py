"""The one exception type users see.

Every problem with the user's input (a bad image, a folder that is not a model, an inconsistent
setting) is raised as a `DreamBoothError` whose message names the file or key and says how to fix
it. The CLI prints the message on one line and exits with status 2 instead of a traceback.
"""


class DreamBoothError(Exception):
    """A problem with the user's files or settings, explained in the message."""
