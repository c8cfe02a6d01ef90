"""What crosses the wire, defined once, with no I/O: the data-plane message and the control protocol."""
