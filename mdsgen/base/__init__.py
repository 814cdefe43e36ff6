"""Errors, storage (local paths and s3://) and the media that registry packages ship."""
