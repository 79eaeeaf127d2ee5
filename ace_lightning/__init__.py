__version__ = "0.1.0"


def apply_adapter(pipe, path):
    """Apply an ACE adapter file to a diffusers pipeline (see :mod:`ace_lightning.export`)."""
    from ace_lightning.export import apply_adapter as _apply

    return _apply(pipe, path)


def remove_adapter(pipe):
    """Remove an ACE adapter from a diffusers pipeline, restoring it bit-for-bit."""
    from ace_lightning.export import remove_adapter as _remove

    return _remove(pipe)
