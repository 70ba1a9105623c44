"""The data layouts --layout chooses from, as plain names: the settings and --help read them
before Paddle loads (dataset.py, which imports Paddle, holds what each means)."""

LAYOUTS = ("auto", "mvtec", "btad")
