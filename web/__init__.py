"""The chat web page and the small static server behind ``python -m web``."""
