"""Hugging Face transformers glue (being written): registers "moeless" in the ExpertsInterface."""


def register() -> None:
    """Placeholder until the integration lands; registers nothing."""
