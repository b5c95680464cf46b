"""What users run: the command line, the settings resolved from YAML and flags, ``inspect``,
``verify`` and ``compare``. The top layer: it may import any other.
"""
