"""Names the pure planner and the runtime share, defined once here and free of dependencies.

The planner imports nothing of the runtime (no torch, no ZeroMQ), yet it reads the same
words as the model code and the orchestrator; those words live here so that both import
one definition.
"""

from __future__ import annotations

__all__ = ["CLIENT", "GRANULARITIES", "MAX_MICROBATCH", "MAX_THREADS", "MAX_PORT", "MAX_UNITS", "MAX_BYTES", "MAX_MBPS",
           "MAX_LATENCY_MS", "MAX_SECONDS", "MAX_FACTOR", "ENCODINGS", "MAX_RUNGS", "MAX_SEARCH_NODES", "MAX_TENSORS", "MAX_CONTEXT"]

# The client's (and bootstrapper's) name in link tables: planner problems, cluster
# inventories, testbed configs, traces. Reserved: no device or node may be called so.
CLIENT = "client"

# How finely a model is cut into units (edgezmq.model.chain, docs/model.md): one unit per
# block (a transformer block; any timm model: a layer group of timm's, e.g. a residual block),
# per half block (attention | MLP) or per sub-layer (ViT layouts), or at every cut point of the
# traced graph (`fine`, any traceable model).
GRANULARITIES = ("block", "half", "sublayer", "fine")

# The ranges of the numbers people and peers give (files, control arguments, flags): every
# number has a finite range, checked where it is parsed (edgezmq.fields, edgezmq.protocol).
MAX_MICROBATCH = 4096  # samples per microbatch
MAX_THREADS = 256  # torch threads of a node or a device
MAX_PORT = 65535  # a TCP port
MAX_UNITS = 1 << 16  # units of a model (unit indices: 0..MAX_UNITS)
MAX_BYTES = 1 << 60  # any byte count: memory, parameters, activations, messages (1 EiB)
MAX_MBPS = 1e7  # any link or NIC rate, megabits per second (10 Tbit/s)
MAX_LATENCY_MS = 1e6  # any one-way latency (1000 s)
MAX_SECONDS = 1e6  # any duration in a file: a unit's time, a timeout (11.6 days)
MAX_FACTOR = 1e6  # any multiplier or ratio: a device's speed, a payload factor, a cost per MB
MAX_SEARCH_NODES = 10**10  # the planner's search effort limit (nodes expanded by one solve)
MAX_TENSORS = 8  # tensors in one data message: the most values a cut between two units may carry
MAX_CONTEXT = 1 << 20  # tokens of a decoder's sequence in a plan or a profile (context, --context)

# How activations may cross a link (edgezmq.protocol.codecs, docs/compression.md): the lossless
# `raw`, then halves, then int8/int4 with a scale per token or per channel (`-ch`), optionally
# ACIQ-clipped (`-aciq`). Plans and `start` name them; a ladder is at most MAX_RUNGS of them.
ENCODINGS = ("raw", "f16", "bf16", "int8", "int8-aciq", "int8-ch", "int8-ch-aciq",
             "int4", "int4-aciq", "int4-ch", "int4-ch-aciq")
MAX_RUNGS = 8
