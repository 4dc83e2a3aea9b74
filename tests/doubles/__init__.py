"""Test doubles: local servers that speak the real protocols (Kubernetes API, Model Registry, Hugging Face Hub,
S3) and the schemas they check requests against. Imported as ``doubles.*`` (``tests/`` is on the path).
"""
