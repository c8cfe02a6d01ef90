"""edgezmq: pipeline-parallel inference of vision transformers across edge devices over ZeroMQ."""

__version__ = "0.1.0"
