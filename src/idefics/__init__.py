"""idefics: fast, faithful inference for the IDEFICS vision-language models."""
from idefics.api import Idefics, load
from idefics.errors import IdeficsError

__all__ = ["Idefics", "IdeficsError", "load"]
