"""Video to soundtrack: the one path that generate, evaluation, training samples and serving call."""
