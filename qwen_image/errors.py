"""User-facing errors: one line that says what went wrong and what to do."""


class QwenImageInputError(ValueError):
    """A bad argument from the user (size, prompt, path, dtype). The message says how to fix it."""
