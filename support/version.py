"""The package version (a leaf: the artifact writer and the CLI read it without importing the driver)."""
VERSION = "0.1.0"
