"""torch.distributed plumbing: bootstrap, process groups and guarded collectives, start-up parity, framed P2P."""
