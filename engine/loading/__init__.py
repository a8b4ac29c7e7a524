"""Pieces of engine.loader: offline file access (files) and meta-device module loading (modules)."""
