"""What runs on a board: the node daemon and its stage runtime, device facts, metrics, node config."""
