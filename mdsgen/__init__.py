"""MDSGen video-to-audio: the library behind the CLI, the pipeline stages and the server."""
__version__ = "0.1.0"
