"""One error type for bad user input, so the CLI can turn it into one line and exit 2."""


class UserInputError(Exception):
    """Bad input from the user: a malformed file, a wrong key, an unreadable checkpoint.

    The message must name what is wrong and where (file, line, key). The CLI
    prints it on one line and exits with code 2; nothing already saved is touched.
    """
