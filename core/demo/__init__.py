"""The built-in demo model: a synthetic Mixtral checkpoint built once into the user's cache."""
