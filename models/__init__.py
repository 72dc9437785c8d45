"""The shipped model bundles, installed as the package data `ichbatch.bundled` (see setup.cfg)."""
