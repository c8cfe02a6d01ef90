"""Operating a deployment: status of its nodes, microbatch traces."""
