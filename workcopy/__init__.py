"""Working copies (slots) and every git operation on them, on the host that owns them.

No database and no Django here: settings come in a ``workcopy.config.Config`` (read from Django's
settings lazily by ``config.from_settings()`` when nobody configured one). A runner host on
another machine uses this package as the server does."""
