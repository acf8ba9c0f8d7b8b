"""The one exception type the library raises on purpose."""


class TLoRAError(ValueError):
    """A T-LoRA setting, file or pipeline that cannot work; the message says what to do."""
