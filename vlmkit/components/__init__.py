"""Built-in components; each module is a plugin, except ``llama_layers`` (building blocks of ``llama``)."""
