"""Cost models: FLOPs, memory and time of every node of a captured graph."""
