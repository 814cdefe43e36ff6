"""The embedded dataset and the per-clip features the model trains on."""
