"""ppstage: a pipeline-parallel runtime for streaming video diffusion."""

__version__ = "0.1.0"
