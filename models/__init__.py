"""The embedded default model (installed as package data: `importlib.resources.files("llamahot.models")`)."""
