"""Training pipelines: download -> train -> evaluate -> register."""
