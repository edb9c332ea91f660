"""The stage actors (rank 0, stage leaders, mesh followers), their deadlines, one rank's process, local launch."""
