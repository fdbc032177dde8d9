"""The one exception family for mistakes a user can fix (bad config, bad data, bad checkpoint)."""


class JaxgptError(Exception):
    """A user-fixable error; command lines print its one-line message and exit non-zero."""


class ConfigError(JaxgptError): ...


class DataError(JaxgptError): ...


class TokenizerError(JaxgptError): ...


class CheckpointError(JaxgptError): ...
