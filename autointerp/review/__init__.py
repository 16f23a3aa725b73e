"""The review page: a server-rendered web app over the store (no torch on its path); the CLI draws the terminal."""
