"""Pydantic request and response models, one file per API, fields in OpenAI's order."""
