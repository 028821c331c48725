"""The package's own error types, at the bottom of the import graph (nothing of greencode imported here), so
any module can raise them: the config (:mod:`greencode.config`) and the decoding loop, which the config's
validation reads, both import :class:`ConfigError` from here."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""
