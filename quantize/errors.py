"""Errors the user can fix: the CLI prints their message without a traceback."""


class UserInputError(ValueError):
    """Bad input (a path, a flag, a file's contents) described in words the user can act on."""


class UnsupportedArchitectureError(UserInputError):
    """The model's architecture is not one the quantizer implements; the message names it."""
