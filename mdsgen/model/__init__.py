"""The networks and the diffusion: MDSGen's transformer, schedules and samplers, VAE, frame encoders, checkpoints."""
