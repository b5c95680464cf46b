"""Built-in example: a tiny model trained with real DeepSpeed (used by the demo, tests and benchmark)."""
