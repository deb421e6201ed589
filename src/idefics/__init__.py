"""idefics: fast, faithful inference for the IDEFICS vision-language models."""
