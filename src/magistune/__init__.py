"""magistune: fine-tune Magistral models with exact mistral-common tokenisation."""

__version__ = "0.1.0"
