"""Training the generator and the VAE, and the ablation sweeps."""
