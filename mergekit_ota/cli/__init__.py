"""The mergekit-ota command line."""
