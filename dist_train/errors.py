"""The one exception type for user mistakes.

A `UserError` carries a message meant for a person: it names the culprit (a key, a file, an import
string), the value that was wrong and what to do instead. The CLI prints it on one line and exits
with status 2, without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, code or files, with a message that says how to fix it."""
