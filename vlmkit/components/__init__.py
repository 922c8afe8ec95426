"""Built-in components; each module is a plugin."""
