"""Audio and video: mel format, vocoders, video decoding, output files, pictures."""
